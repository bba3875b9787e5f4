"""LoRA files: diffusers and kohya/ComfyUI exports that load like each other, non-finite weights refused,
crash-safe writes, one load_lora for files and checkpoints, corrupt or foreign files as one-line errors,
apply_lora's scale."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from gridgen.embedded import TINY_FLUX_CONFIG
from gridgen.generate import generate
from gridgen.inference import GridSampler, resolve_layout
from gridgen.models.lora import (
    KOHYA_LORA_FILE,
    LORA_FILE,
    LoraFileError,
    NonFiniteLoraError,
    apply_lora,
    attach_lora,
    build_lora_config,
    kohya_state_dict,
    load_lora,
    load_lora_weights_into,
    lora_state_dict,
    read_lora_header,
    save_lora,
)
from tests.helpers.flux import MAX_SEQ, tiny_pipe, transformer_output
from tests.helpers.generate import gen_cfg_grid_only
from tests.helpers.lora import foreign_files, randomize_lora, tiny_lora

DIM = TINY_FLUX_CONFIG["num_attention_heads"] * TINY_FLUX_CONFIG["attention_head_dim"]  # 64


# Every block module diffusers' kohya converter maps, except the single blocks' fused linear1: for that one the
# converter hard-codes FLUX.1-dev's widths (3072, 3072, 3072, 12288); test_kohya_linear1_* covers it at those
# widths. attn.to_v is left out on purpose: img_attn_qkv then carries a zero block for it.
PARITY_TARGETS = (r"^(transformer_blocks\.\d+\.(attn\.(to_q|to_k|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)"
                  r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)"
                  r"|single_transformer_blocks\.\d+\.(proj_out|norm\.linear))$")


def test_kohya_export_loads_in_diffusers_like_the_diffusers_file(tmp_path):
    pipe = tiny_pipe()
    base = transformer_output(pipe.transformer)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=PARITY_TARGETS))  # scale 2
    randomize_lora(pipe.transformer)
    ours = transformer_output(pipe.transformer)
    path = save_lora(tmp_path, pipe.transformer, {"gridgen_task": "t2v"}, formats=["diffusers", "kohya"])
    assert path == tmp_path / LORA_FILE and (tmp_path / KOHYA_LORA_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LORA_FILE, KOHYA_LORA_FILE])  # no temporary files

    kohya = load_file(tmp_path / KOHYA_LORA_FILE)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in kohya)
    names = {k.split(".")[0] for k in kohya}
    assert len(names) == 2 * 10 + 2 * 2  # per double block 8 plain + 2 fused qkv; per single block linear2, modulation
    qkv = "lora_unet_double_blocks_1_img_attn_qkv"
    down, up = kohya[f"{qkv}.lora_down.weight"], kohya[f"{qkv}.lora_up.weight"]
    assert down.shape == (12, DIM) and up.shape == (3 * DIM, 12) and kohya[f"{qkv}.alpha"].item() == 24.0
    state = lora_state_dict(pipe.transformer)
    assert torch.equal(down[:4], state["transformer_blocks.1.attn.to_q.lora_A.weight"])
    assert torch.equal(up[DIM:2 * DIM, 4:8], state["transformer_blocks.1.attn.to_k.lora_B.weight"])
    assert not up[2 * DIM:].any() and not down[8:].any()  # to_v is not adapted: zero block
    assert not up[:DIM, 4:].any()  # block-diagonal
    assert kohya["lora_unet_single_blocks_0_linear2.alpha"].item() == 8.0
    header = read_lora_header(tmp_path / KOHYA_LORA_FILE)
    assert header["gridgen_task"] == "t2v" and "lora_adapter_metadata" not in header

    outputs = {}
    for name in (LORA_FILE, KOHYA_LORA_FILE):
        fresh = tiny_pipe()
        fresh.load_lora_weights(tmp_path, weight_name=name)
        outputs[name] = transformer_output(fresh.transformer)
    assert (ours - base).abs().max() > 1e-2  # the LoRA changes the output
    torch.testing.assert_close(outputs[LORA_FILE], ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs[KOHYA_LORA_FILE], ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scales", [(0.5, 0.5, 0.5), (0.5, 2.0, 1.0)], ids=["one-scale", "per-member-scales"])
def test_kohya_linear1_at_flux_dev_widths_is_exact_through_diffusers_converter(scales):
    """Single blocks: to_q, to_k, to_v (+ proj_mlp, here not adapted) fuse into linear1 of FLUX.1-dev's widths."""
    rank, in_features = 2, 8
    widths = {"attn.to_q": 3072, "attn.to_k": 3072, "attn.to_v": 3072, "proj_mlp": 12288}
    gen = torch.Generator().manual_seed(0)
    prefix = "single_transformer_blocks.5."
    state = {}
    for member in ("attn.to_q", "attn.to_k", "attn.to_v"):
        state[f"{prefix}{member}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen)
        state[f"{prefix}{member}.lora_B.weight"] = torch.randn(widths[member], rank, generator=gen)
    scale = dict(zip(("attn.to_q", "attn.to_k", "attn.to_v"), scales, strict=True))
    kohya = kohya_state_dict(state, {prefix + m: s for m, s in scale.items()}, {prefix + "proj_mlp": 12288})
    name = "lora_unet_single_blocks_5_linear1"
    assert sorted(kohya) == [f"{name}.alpha", f"{name}.lora_down.weight", f"{name}.lora_up.weight"]

    def delta(member: str) -> torch.Tensor:  # the update LoRA adds to the member's weight
        if member == "proj_mlp":
            return torch.zeros(widths[member], in_features)
        return scale[member] * state[f"{prefix}{member}.lora_B.weight"] @ state[f"{prefix}{member}.lora_A.weight"]

    # plain oracle: the fused update is the members' updates stacked row-wise
    fused = kohya[f"{name}.alpha"] / kohya[f"{name}.lora_down.weight"].shape[0] * (
        kohya[f"{name}.lora_up.weight"] @ kohya[f"{name}.lora_down.weight"])
    torch.testing.assert_close(fused, torch.cat([delta(m) for m in widths]), rtol=0, atol=1e-5)
    # diffusers' own reader splits it back (its loader then uses scale 1: alpha is folded into lora_A)
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    for member in widths:
        key = f"transformer.{prefix}{member}"
        torch.testing.assert_close(back[f"{key}.lora_B.weight"] @ back[f"{key}.lora_A.weight"], delta(member),
                                   rtol=0, atol=1e-5)


def test_kohya_refuses_modules_it_cannot_name():
    state = {"x_embedder.lora_A.weight": torch.ones(2, 4), "x_embedder.lora_B.weight": torch.ones(4, 2)}
    with pytest.raises(ValueError, match="LoRA on 'x_embedder' cannot be exported in kohya format"):
        kohya_state_dict(state, {"x_embedder": 1.0})
    with pytest.raises(ValueError, match=r"lora.export_formats must list distinct formats from \['diffusers', 'kohya'\], got \['comfy'\]"):
        save_lora("unused", tiny_lora(), formats=["comfy"])


def test_non_finite_lora_is_refused_and_nothing_is_written(tmp_path):
    transformer = tiny_lora()
    save_lora(tmp_path / "lora", transformer, formats=["diffusers", "kohya"])  # a previous, good export
    before = {p.name: p.read_bytes() for p in (tmp_path / "lora").iterdir()}
    name = "single_transformer_blocks.1.attn.to_k.lora_B.weight"
    param = dict(transformer.named_parameters())[name.replace(".lora_B.weight", ".lora_B.default.weight")]
    with torch.no_grad():
        param[0, :2] = float("nan")
        param[3, 0] = float("inf")
    for target in (tmp_path / "lora", tmp_path / "new"):
        with pytest.raises(NonFiniteLoraError) as info:
            save_lora(target, transformer, formats=["diffusers", "kohya"])
        message = str(info.value)
        assert f"LoRA tensor '{name}' has 3 non-finite (NaN/inf) of {DIM * 4} values" in message
        assert "1 of 16 tensors" in message and str(target) in message and "\n" not in message
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "lora").iterdir()} == before  # untouched, no temporary files


def test_crash_while_writing_keeps_the_previous_export(tmp_path, monkeypatch):
    import safetensors.torch

    save_lora(tmp_path, tiny_lora(seed=1), formats=["diffusers", "kohya"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    for fmt in ("diffusers", "kohya"):
        with pytest.raises(OSError, match="disk full"):
            save_lora(tmp_path, tiny_lora(seed=2), formats=[fmt])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no partial or temporary file


def test_save_lora_any_name_and_load_lora_reads_file_and_checkpoint_alike(tmp_path):
    source = tiny_lora(rank=4, seed=3)
    written = save_lora(tmp_path, source, {"gridgen_stage": "coarse"}, name="custom_name.safetensors")
    assert written == tmp_path / "custom_name.safetensors" and [p.name for p in tmp_path.iterdir()] == [written.name]
    expected = lora_state_dict(source)
    from_file = load_lora(written)
    assert (from_file.config.r, from_file.config.lora_alpha, from_file.metadata["gridgen_stage"]) == (4, 4, "coarse")
    assert from_file.state.keys() == expected.keys() and all(torch.equal(from_file.state[k], expected[k]) for k in expected)
    # a checkpoint as GridModule writes it: LoRA parameters under "transformer.", hyper-parameters as plain containers
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"transformer.{n}": p.detach() for n, p in source.named_parameters() if ".lora_" in n},
                "hyper_parameters": {"lora": {"rank": 4, "alpha": 4, "dropout": 0.0, "init": "gaussian",
                                              "target_modules": ["attn.to_q", "attn.to_k"]}, "model": {"name": "tiny"}},
                "global_step": 7}, ckpt)
    from_ckpt = load_lora(tmp_path / "run")  # a run folder without a lora/ export -> its last checkpoint
    assert from_ckpt.path == ckpt and from_ckpt.config.r == 4
    assert from_ckpt.metadata == {"gridgen_model": "tiny", "gridgen_step": "7"}
    assert from_ckpt.state.keys() == expected.keys() and all(torch.equal(from_ckpt.state[k], expected[k]) for k in expected)


def test_init_lora_garbage_kohya_and_foreign_files_are_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"definitely not a safetensors file " * 8)
    with pytest.raises(LoraFileError, match=r"LoRA file '.*garbage.safetensors' is not a readable safetensors file") as info:
        load_lora_weights_into(tiny_lora(), garbage)
    assert "\n" not in str(info.value)
    with pytest.raises(LoraFileError, match="is not a readable safetensors file"):
        read_lora_header(garbage)  # what stage.init_lora=auto reads
    truncated = tmp_path / "truncated" / LORA_FILE
    save_lora(truncated.parent, tiny_lora())
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(LoraFileError, match="is not a readable safetensors file"):
        load_lora_weights_into(tiny_lora(), truncated.parent)

    save_lora(tmp_path / "k", tiny_lora(), formats=["kohya"])
    with pytest.raises(LoraFileError, match="is in kohya/ComfyUI format"):
        load_lora_weights_into(tiny_lora(), tmp_path / "k" / KOHYA_LORA_FILE)
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.ones(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(LoraFileError, match="holds no LoRA weights .*first key 'transformer_blocks.0.attn.to_q.weight'"):
        load_lora_weights_into(tiny_lora(), tmp_path / "model.safetensors")


def test_init_lora_rank_and_targets_must_match_the_config(tmp_path):
    save_lora(tmp_path / "r8", tiny_lora(rank=8))
    with pytest.raises(LoraFileError) as info:
        load_lora_weights_into(tiny_lora(rank=4), tmp_path / "r8")
    assert str(info.value) == (f"init LoRA '{tmp_path / 'r8'}' has rank 8, lora.rank=4: set lora.rank=8 or pick a "
                               "LoRA of rank 4")
    save_lora(tmp_path / "q", tiny_lora(targets=("attn.to_q",)))
    with pytest.raises(LoraFileError) as info:
        load_lora_weights_into(tiny_lora(), tmp_path / "q")
    assert str(info.value) == (f"init LoRA '{tmp_path / 'q'}' adapts [attn.to_q], lora.target_modules adapts "
                               "[attn.to_k,attn.to_q]: set lora.target_modules=[attn.to_q] or pick a LoRA trained "
                               "with these targets")
    source = tiny_lora(seed=5)  # a fitting LoRA loads exactly
    save_lora(tmp_path / "ok", source, {"gridgen_stage": "coarse"})
    target = tiny_lora(seed=6)
    assert load_lora_weights_into(target, tmp_path / "ok")["gridgen_stage"] == "coarse"
    theirs, ours = lora_state_dict(source), lora_state_dict(target)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


@pytest.mark.parametrize("name, message", [
    ("garbage.safetensors", r"LoRA file '.*garbage.safetensors' is not a readable safetensors file"),
    ("garbage.ckpt", r"checkpoint '.*garbage.ckpt' is not a PyTorch zip checkpoint; expected a gridgen training"),
    ("notorch.ckpt", r"checkpoint '.*notorch.ckpt' cannot be read as tensors only .*; expected a gridgen training"),
    ("foreign.ckpt", r"checkpoint '.*foreign.ckpt' was not written by gridgen training"),
    ("model.safetensors", r"LoRA file '.*model.safetensors' holds no LoRA weights \(first key 'x_embedder.weight'"),
    (KOHYA_LORA_FILE, r"is in kohya/ComfyUI format \(lora_unet_\* keys\); gridgen reads the diffusers-format"),
])
def test_generate_refuses_foreign_lora_files(tmp_path, name, message):
    path = foreign_files(tmp_path)[name]
    with pytest.raises(LoraFileError, match=message) as info:
        generate(gen_cfg_grid_only(tmp_path, "prompt=x", f"lora={path}"))
    assert "\n" not in str(info.value)


def test_lora_changes_output_scale_zero_is_base_and_matches_diffusers(lora_run):
    layout = resolve_layout("4x4", 128)
    caption = layout.caption("a red circle moves from left to right")

    def run(lora=None, scale=1.0):
        pipe = tiny_pipe()
        info = apply_lora(pipe.transformer, lora, scale) if lora else None
        sampler = GridSampler(pipe, MAX_SEQ)
        return sampler.sample(layout, sampler.encode_text([caption]), [0], steps=6), info

    base, _ = run()
    tuned, info = run(lora_run)  # a run folder -> its lora/ export
    assert info["rank"] == 4 and info["gridgen_stage"] == "coarse" and info["path"].endswith("lora/pytorch_lora_weights.safetensors")
    assert (tuned - base).abs().max() > 1e-3  # the trained LoRA changes the output
    assert torch.equal(run(lora_run, scale=0.0)[0], base)  # lora_scale=0 is the base model
    from_ckpt, ckpt_info = run(lora_run / "checkpoints" / "last.ckpt")
    assert ckpt_info["path"].endswith(".ckpt") and torch.equal(from_ckpt, tuned)  # the checkpoint holds the same LoRA
    half, _ = run(lora_run / "lora" / "pytorch_lora_weights.safetensors", scale=0.5)
    assert 0 < (half - base).abs().max() < (tuned - base).abs().max()

    pipe = tiny_pipe()
    pipe.load_lora_weights(lora_run / "lora")  # diffusers' own loader on the same file
    theirs = pipe(caption, height=128, width=128, num_inference_steps=6, guidance_scale=3.5,
                  generator=torch.Generator().manual_seed(0), max_sequence_length=MAX_SEQ, output_type="latent").images
    torch.testing.assert_close(tuned, theirs, rtol=0, atol=1e-6)


def test_lora_for_another_model_names_the_key(tmp_path):
    other = FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, "num_layers": 3})  # one more double block
    targets = ["attn.to_q", "attn.to_k"]
    attach_lora(other, build_lora_config(4, 4, 0.0, "gaussian", targets))
    save_lora(tmp_path / "other", other)
    with pytest.raises(LoraFileError, match=r"trained for another model: the model has no 'transformer_blocks\.2\.attn\.to_"):
        apply_lora(tiny_pipe().transformer, tmp_path / "other")
    wider = FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, "num_attention_heads": 8})  # width 128, not 64
    attach_lora(wider, build_lora_config(4, 4, 0.0, "gaussian", targets))
    save_lora(tmp_path / "wider", wider)
    with pytest.raises(LoraFileError, match=r"'(single_)?transformer_blocks\.0\.attn\.to_[qk]\.lora_A\.weight' has shape \(4, 128\), this model's is \(4, 64\)"):
        apply_lora(tiny_pipe().transformer, tmp_path / "wider")
