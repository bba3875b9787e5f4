#!/usr/bin/env python
"""Inference benchmark: gridgen's t2v sampler against diffusers' FluxPipeline, same model, grid, steps and seed.

    python bench/bench_generate.py [--layouts 4x4,8x8,4x6] [--height 256] [--steps 20] [--pairs 30]
                                   [--model tiny|dev-random|small-random] [--compile] [--device cpu|cuda]
                                   [--dtype float32|bfloat16] [--threads 1] [--quick] [--no-write]

Per layout, both sides generate one grid from the same caption and seed:

- gridgen: ``GridSampler`` as ``python -m gridgen.generate`` uses it: text encoding, noise, the shifted FLUX
  schedule, Euler steps of the transformer, VAE decode (export to files is not timed);
- diffusers: ``FluxPipeline.__call__(prompt, height, width, num_inference_steps, guidance_scale=3.5,
  generator, output_type="pt")`` on the same pipeline object, always eager.

``--compile``: the gridgen side runs a copy of the transformer whose repeated blocks are compiled (diffusers'
``compile_repeated_blocks``, as ``model.compile=true`` does in training); compilation happens in its warm-up call.
``--model tiny`` is the embedded tiny FLUX (all components). ``--model dev-random`` is a transformer of
FLUX.1-dev's size (19 double + 38 single blocks, 24 heads x 128, T5 4096 / CLIP 768) with random weights and
random text embeddings of 512 tokens, no VAE: both sides return latents (a GPU run; ~24 GB in bf16).
``--model small-random`` is the same code path on a 2 + 2 block transformer (a CPU check of that path).

Calls come in back-to-back pairs (A B, then B A, ...) after a warm-up call of each; times are medians, the
ratio is the median of the per-pair ratios, robust to the drifting load of a shared machine. Results go to the
``generate`` section of bench/RESULTS.md, one block per model / device / dtype (/ compile).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import harness as h  # first: sets the offline environment before diffusers is imported
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from gridgen.embedded import TINY_FLUX_CONFIG, ensure_tiny_flux
from gridgen.inference import GridSampler, TextConditioning, initial_noise, resolve_layout, sample_grid
from gridgen.layout import GridLayout
from gridgen.models.loading import load_flux_pipeline

TARGET = 1.05
CAPTION = "a red circle moves from left to right on a black background"
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {  # FLUX.1-dev scheduler/scheduler_config.json
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}
INTRO = ("## Inference: gridgen sampler vs diffusers FluxPipeline\n\n"
         "Written by `bench/bench_generate.py`; one block per model / device / dtype.")


# ---------------------------------------------------------------------------------------------- the two sides
def build_pipe(args: argparse.Namespace) -> FluxPipeline:
    device = torch.device(args.device)
    if args.model == "tiny":
        pipe = load_flux_pipeline(ensure_tiny_flux(), dtype=args.torch_dtype, device=device)
    else:
        config = h.DEV_FLUX_CONFIG if args.model == "dev-random" else h.SMALL_FLUX_CONFIG
        transformer = h.random_transformer(config, device, args.torch_dtype, args.seed).eval()
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG), vae=None,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                            transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gridgen_pipe(args: argparse.Namespace, pipe: FluxPipeline) -> FluxPipeline:
    """The pipeline the gridgen side samples with: the same one, or one whose transformer copy is compiled."""
    if not args.compile:
        return pipe
    compiled = copy.deepcopy(pipe.transformer)
    compiled.compile_repeated_blocks()
    return FluxPipeline(**{**pipe.components, "transformer": compiled})


def build_sides(args: argparse.Namespace, layout: GridLayout, pipe: FluxPipeline,
                ours_pipe: FluxPipeline) -> dict[str, Callable[[int], torch.Tensor]]:
    caption, steps, device = layout.caption(CAPTION), args.steps, torch.device(args.device)
    if args.model == "tiny":
        sampler = GridSampler(ours_pipe, max_sequence_length=32)

        def ours(seed: int) -> torch.Tensor:
            text = sampler.encode_text([caption])
            latents = sampler.sample(layout, text, [seed], steps=steps, T=1.0, guidance=3.5)
            return (sampler.decode(latents, layout) / 2 + 0.5).clamp(0, 1)  # as FluxPipeline's output_type="pt"

        def theirs(seed: int) -> torch.Tensor:
            return pipe(caption, height=layout.height, width=layout.width, num_inference_steps=steps,
                        guidance_scale=3.5, generator=[torch.Generator().manual_seed(seed)], max_sequence_length=32,
                        output_type="pt").images
    else:  # random transformer, random text embeddings, latents out
        cfg, dtype = pipe.transformer.config, args.torch_dtype
        gen = torch.Generator().manual_seed(0)
        embeds = torch.randn(1, 512, cfg.joint_attention_dim, generator=gen).to(device, dtype)
        pooled = torch.randn(1, cfg.pooled_projection_dim, generator=gen).to(device, dtype)
        text = TextConditioning(embeds, pooled, torch.zeros(512, 3, device=device, dtype=dtype))

        def ours(seed: int) -> torch.Tensor:
            noise = initial_noise([seed], layout, dtype=dtype, device=device)
            return sample_grid(ours_pipe.transformer, pipe.scheduler, layout, text, noise, steps=steps, T=1.0,
                               guidance=3.5)

        def theirs(seed: int) -> torch.Tensor:
            return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=layout.height, width=layout.width,
                        num_inference_steps=steps, guidance_scale=3.5, generator=[torch.Generator().manual_seed(seed)],
                        output_type="latent").images
    name = "gridgen (compiled)" if args.compile else "gridgen"
    return {name: torch.no_grad()(ours), "diffusers FluxPipeline": torch.no_grad()(theirs)}


# ---------------------------------------------------------------------------------------------- measurement
def time_layout(args: argparse.Namespace, layout: GridLayout, pipe: FluxPipeline,
                ours_pipe: FluxPipeline) -> dict[str, Any]:
    """``--pairs`` back-to-back calls of both sides, the order alternating; ratio = median of the pair ratios."""
    sides = build_sides(args, layout, pipe, ours_pipe)
    outputs = [side(args.seed) for side in sides.values()]  # warm-up (and compilation), and the parity check
    diff = (outputs[0].float() - outputs[1].float()).abs().max().item()
    runs = h.interleaved({name: (lambda side=side: side(args.seed)) for name, side in sides.items()},
                         args.pairs, device=args.device)
    times = {name: [r[0] for r in v] for name, v in runs.items()}
    ratios = h.pair_ratios(*times.values())
    return {"layout": layout, "medians": {name: h.median(v) for name, v in times.items()},
            "ratio": h.median(ratios), "ratio_spread": h.quartiles(ratios), "max_abs_diff": diff}


# ---------------------------------------------------------------------------------------------- report
def describe_model(args: argparse.Namespace) -> str:
    if args.model == "tiny":
        c = TINY_FLUX_CONFIG
        return (f"embedded tiny FLUX (transformer {c['num_layers']} double + {c['num_single_layers']} single blocks, "
                f"width {c['num_attention_heads'] * c['attention_head_dim']}; tiny VAE, CLIP and T5); text encoding, "
                "sampling and VAE decode timed on both sides")
    config = h.DEV_FLUX_CONFIG if args.model == "dev-random" else h.SMALL_FLUX_CONFIG
    return f"{h.describe_flux(config)}, random weights, random text embeddings (512 tokens); sampling only, latents out"


def render(args: argparse.Namespace, results: list[dict[str, Any]], wall: float, load_before: str) -> tuple[str, str]:
    key = f"{args.model}-{args.device}-{args.dtype}" + ("-compile" if args.compile else "")
    ours = "gridgen, compiled blocks" if args.compile else "gridgen"
    rows = []
    for r in results:
        layout, (mine, theirs) = r["layout"], r["medians"].values()
        low, high = r["ratio_spread"]
        rows.append([layout.name, f"{layout.height}x{layout.width}", layout.num_tokens, h.ms(mine), h.ms(theirs),
                     h.ms(mine / layout.num_cells), h.ms(theirs / layout.num_cells),
                     f"{r['ratio']:.3f} ({low:.2f}-{high:.2f})", f"{r['max_abs_diff']:.1e}"])
    worst = max(r["ratio"] for r in results)
    parity = ("compiled kernels round differently from eager ones, so outputs agree to rounding" if args.compile
              else "the sampler reproduces FluxPipeline exactly")
    lines = [
        f"### t2v sampling: {ours} vs diffusers FluxPipeline ({args.model}, {args.device}, {args.dtype})", "",
        *h.environment_lines(args.device, ("diffusers",), load_before),
        f"- wall time {wall:.0f} s; model: {describe_model(args)}",
        f"- {args.steps} steps, guidance 3.5, seed {args.seed}, batch 1; {args.pairs} back-to-back pairs of calls "
        "(order alternating) after one warm-up call each; ratio = median of the pair ratios (p25-p75 in brackets)",
        "",
        *h.table(["layout", "grid px", "tokens", f"{ours} per grid (ms)", "diffusers per grid (ms)",
                  f"{ours} per frame (ms)", "diffusers per frame (ms)", "ratio gridgen/diffusers", "max abs diff"],
                 rows, "llrrrrrrr"),
        "",
        f"Times are medians over the pairs; per frame = per grid / cells. max abs diff: gridgen's output against "
        f"diffusers' for the same seed ({parity}).",
        "",
        f"**ratio gridgen/diffusers (worst layout) = {worst:.3f}** (target <= {TARGET}: {h.verdict(worst, TARGET)})",
    ]
    return key, "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="4x4,8x8,4x6")
    p.add_argument("--height", type=int, default=None, help="grid height in px (default: 256 tiny, 1024 dev-random)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--pairs", type=int, default=30, help="timed back-to-back pairs (one call of each side)")
    p.add_argument("--model", choices=("tiny", "dev-random", "small-random"), default="tiny")
    p.add_argument("--compile", action="store_true", help="gridgen side: repeated blocks compiled (diffusers eager)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads on CPU (default 1: stable ratios on a shared machine; 0 = torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    h.add_output_args(p, "128 px grids, 4 steps, 4 pairs: a smoke run")
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
    load_before, started = h.load_average(), time.perf_counter()
    pipe = build_pipe(args)
    ours_pipe = gridgen_pipe(args, pipe)
    results = []
    for spec in args.layouts.split(","):
        result = time_layout(args, resolve_layout(spec, args.height), pipe, ours_pipe)
        results.append(result)
        (mine, theirs), layout = result["medians"].values(), result["layout"]
        print(f"{layout.name}: gridgen {h.ms(mine)} ms, diffusers {h.ms(theirs)} ms per grid, ratio "
              f"{result['ratio']:.3f}, max abs diff {result['max_abs_diff']:.1e}", file=sys.stderr, flush=True)
    key, block = render(args, results, time.perf_counter() - started, load_before)
    h.finish(args, "generate", block, key, intro=INTRO)
    return 0 if all(math.isfinite(r["ratio"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
