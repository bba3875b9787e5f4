#!/usr/bin/env python
"""Inference benchmark: gridgen's t2v sampler against diffusers' FluxPipeline, same model, grid, steps and seed.

    python bench/bench_generate.py [--layouts 4x4,8x8,4x6] [--height 256] [--steps 20]
                                   [--pairs 30] [--model tiny|dev-random|small-random] [--device cpu|cuda]
                                   [--dtype float32|bfloat16] [--threads 1] [--quick] [--no-write]

Per layout, both sides generate one grid from the same caption and seed:

- gridgen: ``GridSampler`` as ``python -m gridgen.generate`` uses it: text encoding, noise, the shifted FLUX
  schedule, 20 Euler steps of the transformer, VAE decode (export to files is not timed);
- diffusers: ``FluxPipeline.__call__(prompt, height, width, num_inference_steps, guidance_scale=3.5,
  generator, output_type="pt")`` on the same pipeline object.

``--model tiny`` is the embedded tiny FLUX (all components). ``--model dev-random`` is a transformer of
FLUX.1-dev's size (19 double + 38 single blocks, 24 heads x 128, T5 4096 / CLIP 768) with random weights and
random text embeddings of 512 tokens, no VAE: both sides return latents (a GPU run; ~24 GB in bf16).
``--model small-random`` is the same code path on a 2 + 2 block transformer (a CPU check of that path).

Calls come in back-to-back pairs (A B, then B A, ...) after a warm-up call of each; times are medians, the
ratio is the median of the per-pair ratios, robust to the drifting load of a shared machine. Results go to bench/RESULTS.md between
``<!-- bench:generate:start -->`` and ``<!-- bench:generate:end -->``, one block per model/device/dtype.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import diffusers  # noqa: E402
import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402

from gridgen.inference import GridSampler, TextConditioning, initial_noise, resolve_layout, sample_grid  # noqa: E402
from gridgen.layout import GridLayout  # noqa: E402
from gridgen.models.loading import load_flux_pipeline  # noqa: E402
from gridgen.models.tiny import TINY_FLUX_CONFIG, ensure_tiny_flux  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- bench:generate:start -->", "<!-- bench:generate:end -->"
TARGET = 1.05
CAPTION = "a red circle moves from left to right on a black background"

DEV_FLUX_CONFIG: dict[str, Any] = {  # black-forest-labs/FLUX.1-dev transformer/config.json
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
SMALL_FLUX_CONFIG: dict[str, Any] = {**DEV_FLUX_CONFIG, "num_layers": 2, "num_single_layers": 2,
                                     "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 64,
                                     "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)}
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {  # FLUX.1-dev scheduler/scheduler_config.json
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- the two sides
class Side:
    """One way of generating a grid: ``run(seed) -> output tensor``."""

    def __init__(self, name: str, run: Callable[[int], torch.Tensor]) -> None:
        self.name, self.run = name, run


def build_sides(args: argparse.Namespace, layout: GridLayout, pipe: FluxPipeline) -> tuple[Side, Side]:
    caption = layout.caption(CAPTION)
    steps, device = args.steps, torch.device(args.device)
    if args.model == "tiny":
        sampler = GridSampler(pipe, max_sequence_length=32)

        def ours(seed: int) -> torch.Tensor:
            text = sampler.encode_text([caption])
            latents = sampler.sample(layout, text, [seed], steps=steps, T=1.0, guidance=3.5)
            return (sampler.decode(latents, layout) / 2 + 0.5).clamp(0, 1)  # as FluxPipeline's output_type="pt"

        def theirs(seed: int) -> torch.Tensor:
            return pipe(caption, height=layout.height, width=layout.width, num_inference_steps=steps,
                        guidance_scale=3.5, generator=[torch.Generator().manual_seed(seed)], max_sequence_length=32,
                        output_type="pt").images
    else:  # random transformer, random text embeddings, latents out
        cfg = pipe.transformer.config
        gen = torch.Generator().manual_seed(0)
        embeds = torch.randn(1, 512, cfg.joint_attention_dim, generator=gen).to(device, args.torch_dtype)
        pooled = torch.randn(1, cfg.pooled_projection_dim, generator=gen).to(device, args.torch_dtype)
        text = TextConditioning(embeds, pooled, torch.zeros(512, 3, device=device, dtype=args.torch_dtype))

        def ours(seed: int) -> torch.Tensor:
            noise = initial_noise([seed], layout, dtype=args.torch_dtype, device=device)
            return sample_grid(pipe.transformer, pipe.scheduler, layout, text, noise, steps=steps, T=1.0, guidance=3.5)

        def theirs(seed: int) -> torch.Tensor:
            return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=layout.height, width=layout.width,
                        num_inference_steps=steps, guidance_scale=3.5, generator=[torch.Generator().manual_seed(seed)],
                        output_type="latent").images
    return Side("gridgen", torch.no_grad()(ours)), Side("diffusers FluxPipeline", torch.no_grad()(theirs))


def build_pipe(args: argparse.Namespace) -> FluxPipeline:
    device = torch.device(args.device)
    if args.model == "tiny":
        pipe = load_flux_pipeline(ensure_tiny_flux(), dtype=args.torch_dtype, device=device)
    else:
        config = DEV_FLUX_CONFIG if args.model == "dev-random" else SMALL_FLUX_CONFIG
        torch.manual_seed(args.seed)
        with torch.device(device):
            transformer = FluxTransformer2DModel(**config).to(args.torch_dtype).eval()
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG)
        pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_layout(args: argparse.Namespace, layout: GridLayout, pipe: FluxPipeline) -> dict[str, Any]:
    """``--pairs`` back-to-back calls of both sides, the order alternating; ratio = median of the pair ratios.

    A pair's two calls run within a fraction of a second of each other, so load from other processes on a shared
    machine (which drifts over seconds) cancels in the ratio; the medians of the times themselves do not.
    """
    device = torch.device(args.device)
    sides = build_sides(args, layout, pipe)
    outputs = [side.run(args.seed) for side in sides]  # warm-up, and the parity check
    diff = (outputs[0].float() - outputs[1].float()).abs().max().item()
    times: dict[str, list[float]] = {side.name: [] for side in sides}
    ratios = []
    for pair in range(args.pairs):
        measured = {}
        for side in (sides if pair % 2 == 0 else sides[::-1]):
            sync(device)
            start = time.perf_counter()
            side.run(args.seed)
            sync(device)
            measured[side.name] = time.perf_counter() - start
            times[side.name].append(measured[side.name])
        ratios.append(measured[sides[0].name] / measured[sides[1].name])
    return {"layout": layout, "medians": {name: statistics.median(v) for name, v in times.items()},
            "spread": {name: quartiles(v) for name, v in times.items()},
            "ratio": statistics.median(ratios), "ratio_spread": quartiles(ratios), "max_abs_diff": diff}


def quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


# ---------------------------------------------------------------------------------------------- report
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} logical cores, torch threads: {torch.get_num_threads()}"


def render(args: argparse.Namespace, results: list[dict[str, Any]], wall: float, load: tuple[float, float]) -> tuple[str, str]:
    key = f"{args.model}-{args.device}-{args.dtype}"
    ms = lambda x: f"{x * 1e3:.1f}"  # noqa: E731
    lines = [
        f"### t2v sampling: gridgen vs diffusers FluxPipeline ({args.model}, {args.device}, {args.dtype})",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; wall time {wall:.0f} s",
        f"- command: `python bench/bench_generate.py {shlex.join(sys.argv[1:])}`",
        f"- device: {device_name(torch.device(args.device))}; load average before / after: "
        f"{' '.join(f'{x:.2f}' for x in load[0])} / {' '.join(f'{x:.2f}' for x in load[1])}",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}",
        f"- model: {describe_model(args)}",
        f"- {args.steps} steps, guidance 3.5, seed {args.seed}, batch 1; {args.pairs} back-to-back pairs of calls "
        "(order alternating) after one warm-up call each; ratio = median of the pair ratios (p25-p75 in brackets)",
        "",
        "| layout | grid px | tokens | gridgen per grid (ms) | diffusers per grid (ms) | gridgen per frame (ms) "
        "| diffusers per frame (ms) | ratio gridgen/diffusers | max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        layout, (ours, theirs) = r["layout"], r["medians"].values()
        low, high = r["ratio_spread"]
        lines.append(f"| {layout.name} | {layout.height}x{layout.width} | {layout.num_tokens} | {ms(ours)} | "
                     f"{ms(theirs)} | {ms(ours / layout.num_cells)} | {ms(theirs / layout.num_cells)} | "
                     f"{r['ratio']:.3f} ({low:.2f}-{high:.2f}) | {r['max_abs_diff']:.1e} |")
    worst = max(r["ratio"] for r in results)
    lines += ["", "Times are medians over the pairs; per frame = per grid / cells. max abs diff: gridgen's output "
              "against diffusers' for the same seed (the sampler reproduces FluxPipeline exactly).", "",
              f"**ratio gridgen/diffusers (worst layout) = {worst:.3f}** (target <= {TARGET}: "
              f"{'PASS' if worst <= TARGET else 'FAIL'})"]
    return key, "\n".join(lines)


def describe_model(args: argparse.Namespace) -> str:
    if args.model == "tiny":
        c = TINY_FLUX_CONFIG
        return (f"embedded tiny FLUX (transformer {c['num_layers']} double + {c['num_single_layers']} single blocks, "
                f"width {c['num_attention_heads'] * c['attention_head_dim']}; tiny VAE, CLIP and T5); text encoding, "
                "sampling and VAE decode timed on both sides")
    c = DEV_FLUX_CONFIG if args.model == "dev-random" else SMALL_FLUX_CONFIG
    return (f"FluxTransformer2DModel {c['num_layers']} double + {c['num_single_layers']} single blocks, "
            f"{c['num_attention_heads']} heads x {c['attention_head_dim']}, random weights, random text embeddings "
            "(512 tokens); sampling only, latents out (no text encoders, no VAE)")


def update_results(path: Path, key: str, block: str) -> None:
    """Replace this run's block inside the generate section (created at the end of the file if missing)."""
    text = path.read_text() if path.exists() else "# gridgen benchmarks\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n## Inference: gridgen sampler vs diffusers FluxPipeline\n\n" \
                               f"Written by `bench/bench_generate.py`; one block per model / device / dtype.\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    section, tail = rest.split(END, 1)
    sub_begin, sub_end = f"<!-- generate:{key} -->", f"<!-- /generate:{key} -->"
    sub = f"{sub_begin}\n{block}\n{sub_end}"
    if sub_begin in section and sub_end in section:
        pattern = re.escape(sub_begin) + r".*?" + re.escape(sub_end)
        section = re.sub(pattern, lambda _: sub, section, flags=re.S)
    else:
        section = section.rstrip() + f"\n\n{sub}\n"
    path.write_text(head + BEGIN + section + END + tail)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="4x4,8x8,4x6")
    p.add_argument("--height", type=int, default=None, help="grid height in px (default: 256 tiny, 1024 dev-random)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--pairs", type=int, default=30, help="timed back-to-back pairs (one call of each side)")
    p.add_argument("--model", choices=("tiny", "dev-random", "small-random"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads on CPU (default 1: stable ratios on a shared machine; 0 = torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="128 px grids, 4 steps, 4 pairs: a smoke run")
    p.add_argument("--no-write", action="store_true", help="print only, do not update the results file")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.torch_dtype = getattr(torch, args.dtype)
    args.height = args.height or (1024 if args.model == "dev-random" else 256)
    if args.quick:
        args.height, args.steps, args.pairs = 128, 4, 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    pipe = build_pipe(args)
    results = []
    for spec in args.layouts.split(","):
        layout = resolve_layout(spec, args.height)
        result = time_layout(args, layout, pipe)
        results.append(result)
        ours, theirs = result["medians"].values()
        print(f"{layout.name}: gridgen {ours * 1e3:.1f} ms, diffusers {theirs * 1e3:.1f} ms per grid, "
              f"ratio {result['ratio']:.3f}, max abs diff {result['max_abs_diff']:.1e}", file=sys.stderr, flush=True)
    key, block = render(args, results, time.perf_counter() - started, (load_before, os.getloadavg()))
    print(block)
    if not args.no_write:
        update_results(args.output, key, block)
        print(f"\nwrote {args.output} (section {BEGIN} ... {END}, block {key})", file=sys.stderr)
    return 0 if all(math.isfinite(r["ratio"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
