"""Latent/text caches on the embedded tiny FLUX: keyed pairing, cached == uncached training, stale caches refused."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir

import gridgen.models.builder as builder_lib
import gridgen.training.module as module_lib
from gridgen.cache import cache
from gridgen.config import CONF_DIR
from gridgen.data.cache import (
    CACHE_MANIFEST,
    CacheMismatchError,
    cache_fingerprint,
    cache_shards,
    layout_hash,
    load_encoders,
    verify_cache_folders,
)
from gridgen.data.datamodule import GridDataModule, SkipCounter, ToSample, resolve_shards
from gridgen.embedded import ensure_tiny_flux, write_sample_shards
from gridgen.layout import GridLayout
from gridgen.models.flux import encode_images, encode_prompts
from gridgen.train import train
from tests.helpers.train import make_cfg, run_cli

TINY = {"name": "flux_tiny", "pretrained": "embedded:tiny", "revision": None, "variant": None,
        "max_sequence_length": 32}



@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine OpenMP spin-waiting makes a 3-step tiny run take ~18 s
    instead of ~0.4 s. Both sides of every comparison here run with the same setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

def cache_cfg(tmp: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("cache", overrides=[f"paths.root_dir={tmp}", *overrides])


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """video/: 2 train shards + 1 val shard of 4x4 grids; multiview/: 1 train + 1 val of 4x6 grids."""
    root = tmp_path_factory.mktemp("raw")
    write_sample_shards(root, seed=0, num_video=8, num_multiview=4, num_val=2, samples_per_shard=4)
    return root


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory) -> tuple[Path, dict]:
    """`make cache data=sample data.train_shards=<raw>` (both layouts; batches of 3 cross layout boundaries)."""
    tmp = tmp_path_factory.mktemp("cache")
    cfg = cache_cfg(tmp, f"data.train_shards={raw}", f"cache.out={tmp / 'cache'}", "cache.batch_size=3")
    manifests = cache(cfg)
    return tmp / "cache", manifests["train"]


@pytest.fixture(scope="module")
def pipe():
    return load_encoders(TINY)


def _source_samples(urls: list[str]) -> dict[str, dict]:
    skips = SkipCounter()
    to_sample = ToSample("png;jpg;jpeg", "txt", cached=False, skips=skips)
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode("torchrgb8").map(to_sample)}


# ---- the cache itself ----------------------------------------------------------------------------------


def test_cache_pairs_every_tensor_with_its_own_sample(raw, built, pipe):
    out, manifest = built
    assert manifest["status"] == "complete" and manifest["counts"] == {"train": 12, "val": 4}
    assert manifest["fingerprint"] == cache_fingerprint(TINY) and manifest["model"] == "flux_tiny"
    assert set(manifest["layouts"]) == {"4x4@128x128", "4x6@128x192"} and manifest["skipped"] == 0
    assert [p.name for p in sorted(out.glob("*.tar"))] == [*(f"train-{i:06d}.tar" for i in range(3)),
                                                          "val-000000.tar", "val-000001.tar"]
    source = _source_samples(resolve_shards(raw, "train") + resolve_shards(raw, "val"))
    cached = {s["__key__"]: s for s in wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False)}
    assert cached.keys() == source.keys()  # plain webdataset reads it; every sample, under its own key

    fingerprint = cache_fingerprint(TINY)
    latents_by_key = {}
    for key, sample in cached.items():
        tensors = safetensors.torch.load(sample["cache.safetensors"])
        src = source[key]
        layout = src["layout"]
        meta, caption = json.loads(sample["json"]), sample["txt"].decode()
        assert caption == src["caption"]
        assert (meta["rows"], meta["cols"], meta["cell_height"], meta["cell_width"]) == (
            layout.rows, layout.cols, layout.cell_height, layout.cell_width)
        assert meta["gridgen_cache"]["hash"] == layout_hash(fingerprint, layout)
        # the reference: this sample alone through the functions training uses
        own_latents = encode_images(pipe.vae, src["pixel_values"][None])[0]  # (N, 64)
        embeds, pooled, _ = encode_prompts(pipe, [caption], 32)
        assert tensors["latents"].shape == (layout.num_tokens, 64)
        torch.testing.assert_close(tensors["latents"], own_latents, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tensors["prompt_embeds"], embeds[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tensors["pooled_prompt_embeds"], pooled[0], rtol=1e-4, atol=1e-5)
        tokens = pipe.tokenizer_2(caption, max_length=32, truncation=True)["input_ids"]
        assert tensors["text_mask"].dtype == torch.uint8 and tensors["text_mask"].tolist() == (
            [1] * len(tokens) + [0] * (32 - len(tokens)))
        latents_by_key[key] = tensors["latents"]
    # samples differ, so a pairing by position would have failed the comparisons above
    video = sorted(k for k in latents_by_key if k.startswith("video-train"))
    assert (latents_by_key[video[0]] - latents_by_key[video[1]]).abs().max() > 0.1


def test_cache_resumes_and_refuses_another_model(raw, built, pipe, tmp_path):
    out, _ = built
    work = tmp_path / "cache"
    shards = {"train": resolve_shards(raw / "video", "train")}
    first = cache_shards(pipe, shards, work, TINY, batch_size=4)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in work.glob("*.tar")}
    assert cache_shards(pipe, shards, work, TINY, batch_size=4)["shards"] == first["shards"]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in work.glob("*.tar")} == before  # kept

    # an interrupted run: the last shard missing, the manifest incomplete -> training refuses, a re-run finishes
    manifest = json.loads((work / CACHE_MANIFEST).read_text())
    manifest["status"] = "incomplete"
    del manifest["shards"]["train-000001.tar"]
    (work / CACHE_MANIFEST).write_text(json.dumps(manifest))
    (work / "train-000001.tar").unlink()
    with pytest.raises(CacheMismatchError, match="is incomplete .*again to finish it"):
        verify_cache_folders([str(work / "train-000000.tar")], TINY)
    cache_shards(pipe, shards, work, TINY, batch_size=4)
    assert {p.name: p.read_bytes() for p in work.glob("*.tar")} == {k: v[1] for k, v in before.items()}  # same bytes
    verify_cache_folders([str(work / "train-000000.tar")], TINY)

    with pytest.raises(CacheMismatchError, match=r"model.max_sequence_length=32, this run uses model.max_sequence_length=16.*cache.overwrite=true"):
        cache_shards(pipe, shards, work, {**TINY, "max_sequence_length": 16})


# ---- training on the cache -----------------------------------------------------------------------------


def _losses(run: Path) -> dict[int, tuple[float, float, float]]:
    with open(run / "metrics" / "metrics.csv") as f:
        return {int(r["step"]): (float(r["train/loss"]), float(r["train/loss_base"]), float(r["train/loss_flow"]))
                for r in csv.DictReader(f) if r.get("train/loss")}


def test_cached_training_equals_uncached_without_encoders(raw, built, tmp_path, monkeypatch):
    out, _ = built
    common = ["trainer.max_steps=3", "trainer.log_every_n_steps=1", "optim.lr=1e-2", "lora.rank=4",
              "callbacks.alpha.alpha_max=0.5", "callbacks.alpha.ramp_steps=1"]
    train(make_cfg(tmp_path / "raw", f"data.train_shards={raw}", *common))

    loads = []
    original = builder_lib.load_flux_pipeline  # the one builder training and generation share

    def spy(*args, **kwargs):
        loads.append(kwargs)
        return original(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached run must not encode images or prompts")

    monkeypatch.setattr(builder_lib, "load_flux_pipeline", spy)
    monkeypatch.setattr(module_lib, "encode_images", forbidden)
    monkeypatch.setattr(module_lib, "encode_prompts", forbidden)
    train(make_cfg(tmp_path / "cached", "data.cached=true", f"data.train_shards={out}", *common))
    assert loads and all(not kw["load_vae"] and not kw["load_text_encoders"] for kw in loads)

    raw_losses, cached_losses = _losses(tmp_path / "raw" / "run"), _losses(tmp_path / "cached" / "run")
    assert sorted(raw_losses) == sorted(cached_losses) == [0, 1, 2]
    for step in raw_losses:  # same batches (keys), same noise, same LoRA updates: the same losses
        assert cached_losses[step] == pytest.approx(raw_losses[step], rel=1e-5, abs=1e-6), step
    assert raw_losses[2][2] > 0 and raw_losses[0] != raw_losses[1]


def test_cached_batches_carry_tensors_and_remote_caches_are_checked_per_sample(built):
    out, _ = built
    url = f"pipe:cat {out / 'train-000000.tar'}"
    dm = GridDataModule(url, batch_size=2, samples_per_epoch=4, cached=True, cache_model=TINY, allow_pipe=True)
    batch = next(iter(dm.train_dataloader()))
    assert "pixel_values" not in batch
    tokens = GridLayout(**batch["layout"]).num_tokens
    assert batch["latents"].shape == (2, tokens, 64) and batch["prompt_embeds"].shape[:2] == (2, 32)
    assert batch["pooled_prompt_embeds"].shape[0] == 2 and batch["text_mask"].shape == (2, 32)

    stale = GridDataModule(url, batch_size=2, samples_per_epoch=4, cached=True,
                           cache_model={**TINY, "max_sequence_length": 16}, allow_pipe=True)
    stale.setup("fit")  # a pipe: has no folder to read cache.json from ...
    with pytest.raises(CacheMismatchError, match="was built with model.max_sequence_length=32, this run uses "
                                                 "model.max_sequence_length=16"):
        next(iter(stale.train_dataloader()))  # ... so every sample is checked, and a stale one stops the run
    assert stale.num_skipped == 0  # refused, not skipped


@pytest.mark.parametrize("override, message", [
    ("model.max_sequence_length=16", "was built with model.max_sequence_length=32, this run uses "
     "model.max_sequence_length=16; rebuild it with `make cache data=<name> model=flux_tiny "
     "model.max_sequence_length=16` or train with model.max_sequence_length=32"),
    ("model.pretrained=TINY_FOLDER", "was built for model.pretrained=embedded:tiny (model=flux_tiny), this run uses "
     "model.pretrained=TINY_FOLDER; rebuild it with `make cache data=<name> model=flux_tiny` or train on it with "
     "model=flux_tiny"),
])
def test_stale_cache_is_refused_in_one_line(built, tmp_path, override, message):
    out, _ = built
    folder = str(ensure_tiny_flux())  # the same weights under another id: still another model to the cache
    cfg = make_cfg(tmp_path, "data.cached=true", f"data.train_shards={out}", override.replace("TINY_FOLDER", folder))
    with pytest.raises(CacheMismatchError) as info:
        train(cfg)
    assert str(info.value) == f"cache '{out}' " + message.replace("TINY_FOLDER", folder)


def test_stale_cache_on_the_command_line(built, tmp_path):
    out, _ = built
    proc = run_cli("data.cached=true", f"data.train_shards={out}", "model.max_sequence_length=16", "logger=none",
                   f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.train: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "model.max_sequence_length=32" in errors[0] and "make cache" in errors[0]


def test_raw_shards_are_not_a_cache(raw):
    dm = GridDataModule(raw / "video", cached=True, cache_model=TINY)
    with pytest.raises(FileNotFoundError, match=r"holds no gridgen cache \(no cache.json\).*make cache data=<name>"):
        dm.setup("fit")


def test_make_cache_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shards matching 'train-\\*.tar' in '.*empty'"):
        cache(cache_cfg(tmp_path, f"data.train_shards={tmp_path / 'empty'}", f"cache.out={tmp_path / 'c'}"))
    with pytest.raises(ValueError, match="drop data.cached=true here"):
        cache(cache_cfg(tmp_path, "data.cached=true", f"cache.out={tmp_path / 'c'}"))
    assert not (tmp_path / "c").exists()  # nothing written, no model loaded


def test_cache_config_composes_for_every_data_config(tmp_path):
    for data in ("sample", "shards", "webvid", "tiktok", "objaverse", "video_mix"):
        cfg = cache_cfg(tmp_path, f"data={data}", "model=flux_dev")
        assert cfg.data.cache_model.pretrained == cfg.model.pretrained
        assert cfg.data.cache_model.max_sequence_length == 512


def test_make_cache_command_line_and_its_training_advice(raw, tmp_path):
    """`python -m gridgen.cache ...` builds the cache and prints the `make train` overrides that use it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "gridgen.cache", f"data.train_shards={raw / 'video'}",
                           f"cache.out={tmp_path / 'cache'}", f"paths.root_dir={tmp_path}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "cache" / CACHE_MANIFEST).read_text())
    assert manifest["command"] == "make cache data=sample model=flux_tiny " \
                                  f"data.train_shards={raw / 'video'} cache.out={tmp_path / 'cache'} paths.root_dir={tmp_path}"
    assert manifest["counts"] == {"train": 8, "val": 2} and (tmp_path / "cache" / "cache.log").is_file()
    advice = next(line for line in proc.stdout.splitlines() if line.startswith("train with"))
    overrides = advice.split("make train ", 1)[1].split()
    assert overrides == ["data=sample", "model=flux_tiny", "data.cached=true", f"data.train_shards={tmp_path / 'cache'}",
                         f"data.val_shards={tmp_path / 'cache'}"]
    metrics = train(make_cfg(tmp_path / "run", *overrides, "trainer.max_steps=1"))
    assert metrics["train/loss"] > 0


# ---- several processes ----------------------------------------------------------------------------------


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_ranks_share_the_shards_and_make_the_same_cache(raw, pipe, tmp_path):
    """2 ranks, each with its own shard list and no waiting on the other (here one after the other, the second
    first): the same shards and cache.json as one process; the manifest is written by the rank that ends last."""
    shards = {"train": resolve_shards(raw / "video", "train"), "val": resolve_shards(raw / "video", "val")}
    single = cache_shards(pipe, shards, tmp_path / "one", TINY, batch_size=4)
    dist = tmp_path / "two"
    partial = cache_shards(pipe, shards, dist, TINY, batch_size=4, rank=1, world_size=2)
    assert partial["status"] == "incomplete" and partial["missing"] == ["train-000000.tar", "val-000000.tar"]
    assert sorted(_folder_bytes(dist)) == ["train-000001.tar"]  # rank 1's shard only
    with pytest.raises(CacheMismatchError, match="is incomplete"):  # training refuses it meanwhile
        verify_cache_folders([str(dist / "train-000001.tar")], TINY)
    merged = cache_shards(pipe, shards, dist, TINY, batch_size=4, rank=0, world_size=2)
    assert merged == single and merged["status"] == "complete"
    assert _folder_bytes(dist) == _folder_bytes(tmp_path / "one")
    assert json.loads((dist / CACHE_MANIFEST).read_text()) == json.loads((tmp_path / "one" / CACHE_MANIFEST).read_text())
    # resumable per shard: a rank run again finds its shards written and the cache complete
    before = {p.name: p.stat().st_mtime_ns for p in dist.glob("*.tar")}
    assert cache_shards(pipe, shards, dist, TINY, batch_size=4, rank=1, world_size=2)["status"] == "complete"
    assert {p.name: p.stat().st_mtime_ns for p in dist.glob("*.tar")} == before
    with pytest.raises(ValueError, match=r"cache.rank must be one of 0..1 \(cache.world_size=2\), got 2"):
        cache_shards(pipe, shards, dist, TINY, rank=2, world_size=2)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_equal_one(raw, tmp_path):
    """`torchrun --nproc-per-node 2 -m gridgen.cache ...` (RANK/WORLD_SIZE from torchrun, CPU) == one process."""
    import subprocess
    import sys

    args = ["data=sample", f"data.train_shards={raw}", "cache.batch_size=4", f"paths.root_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # one thread each: same float sums
    subprocess.run([sys.executable, "-m", "gridgen.cache", *args, f"cache.out={tmp_path / 'one'}"], check=True,
                   capture_output=True, cwd=tmp_path, timeout=600, env=env)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                           "gridgen.cache", *args, f"cache.out={tmp_path / 'two'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "(rank 0 of 2)" in output and "(rank 1 of 2)" in output  # two ranks, each loading its encoders
    assert f"cache          {tmp_path / 'two'} (12 train, 4 val samples, 0 skipped)" in proc.stdout  # the last one
    one, two = tmp_path / "one", tmp_path / "two"
    assert _folder_bytes(two) == _folder_bytes(one) and len(_folder_bytes(one)) == 5  # 3 train + 2 val shards
    manifests = [json.loads((f / CACHE_MANIFEST).read_text()) for f in (one, two)]
    for m in manifests:
        m.pop("command")  # the command line differs (cache.out)
    assert manifests[0] == manifests[1] and manifests[0]["status"] == "complete"
