#!/usr/bin/env python
"""Training-step benchmark: Lightning overhead, the cost of L_flow, peak memory and the LoRA file size.

    python bench/bench_train.py [--steps 12] [--warmup 2] [--repeats 3] [--batch-size 1]
                                [--device cpu|cuda] [--dtype float32|bfloat16] [--quick] [--no-write]

Model: a FLUX transformer (FluxTransformer2DModel, 4 double + 4 single blocks, 4 heads x 64 = width 256,
guidance embedding) with random weights built from a seed, LoRA attached as a run attaches it (conf/lora),
on a 4x4 grid of 128 px cells = 512x512 px = 32x32 = 1024 tokens of 64 packed channels. The batch carries
cached latents and random text embeddings, so the VAE and text encoders are not part of any timing.

1. Framework overhead: a ``lightning.Trainer`` (built from conf/trainer + conf/strategy, with the run's
   per-step callbacks AlphaSchedule, GridThroughput and RunSummary; no logger, no checkpointing, no progress
   bar) fitting GridModule on a DataLoader that repeats the batch, timed from inside (time between
   consecutive ``on_train_batch_start``, so data fetch, transfer, hooks, logging, clipping, optimiser and
   scheduler are all in), against a bare loop
   ``compute_losses -> backward -> clip -> AdamW.step -> zero_grad -> scheduler.step`` on the same module.
   Blocks of ``--steps`` steps, interleaved A B / B A ..., ``--warmup`` untimed steps at the start of each.
2. L_flow: bare-loop steps with alpha > 0, with alpha = 0 (as GridModule does it: L_flow still computed and
   back-propagated, weighted by 0) and with L_flow skipped (L_base only), interleaved step by step in a
   rotating order; plus the two losses alone, forward + backward on (B, N, 64) tensors.
3. Peak memory of a step of each variant (CPU: peak RSS, reset through /proc/self/clear_refs after
   malloc_trim; CUDA: torch.cuda.max_memory_allocated) and the LoRA file (``save_lora``) against the
   transformer's parameter bytes.
4. GridModule's own work outside the transformer (noise draws, position ids, grad-norm logging), timed alone.

Ratios of variants run step by step are medians of per-pair ratios of neighbouring steps (robust to a
drifting load); those of blocks are medians over repeats of ratios of median step times. The results go to this script's
section of bench/RESULTS.md (between ``<!-- bench:train:start -->`` and ``<!-- bench:train:end -->``; the file
is shared with the other benchmarks), one block per device / dtype / batch size that a later run replaces.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import inspect
import logging
import math
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no torchvision notices from transformers' imports
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import diffusers  # noqa: E402
import lightning as L  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import gridgen.training.module as module_lib  # noqa: E402
from gridgen.config import CONF_DIR, register_resolvers  # noqa: E402
from gridgen.layout import GridLayout  # noqa: E402
from gridgen.losses import base_loss, temporal_flow_loss  # noqa: E402
from gridgen.models.lora import LORA_FILE, save_lora  # noqa: E402
from gridgen.models.tiny import TINY_FLUX_CONFIG  # noqa: E402
from gridgen.training.module import GridModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "bench" / "RESULTS.md"

# 4 double + 4 single blocks, width 4 x 64 = 256, rope axes summing to the head dim, small text dims.
BENCH_FLUX_CONFIG: dict[str, Any] = {
    **TINY_FLUX_CONFIG,
    "num_layers": 4,
    "num_single_layers": 4,
    "attention_head_dim": 64,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "axes_dims_rope": (16, 24, 24),
}
BENCH_LAYOUT = GridLayout(4, 4, 128, 128)  # 512x512 px, 32x32 = 1024 tokens
QUICK_FLUX_CONFIG: dict[str, Any] = dict(TINY_FLUX_CONFIG)  # 2 + 2 blocks, width 64
QUICK_LAYOUT = GridLayout(2, 2, 64, 64)  # 128x128 px, 8x8 = 64 tokens

# The run's callbacks (conf/callbacks) that act on every step; checkpointing, the LR monitor (needs a logger)
# and the end-of-run LoRA export are left out.
RUN_CALLBACKS = ("alpha", "throughput", "summary")
TARGET_FRAMEWORK = 1.05
TARGET_FLOW = 1.03
MALLOC_MMAP_THRESHOLD = 64 << 20

log = logging.getLogger("bench")


# ---------------------------------------------------------------------------------------------- helpers
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def spread(xs: list[float]) -> str:
    """``p25-p75`` of a sample, in ms."""
    if len(xs) < 2:
        return "-"
    q = statistics.quantiles(xs, n=4)
    return f"{q[0] * 1e3:.1f}-{q[2] * 1e3:.1f}"


def ms(x: float) -> str:
    return f"{x * 1e3:.1f}" if math.isfinite(x) else "nan"


def us(x: float) -> str:
    return f"{x * 1e6:.0f}" if math.isfinite(x) else "nan"


def mib(x: float) -> str:
    return f"{x / 2**20:.1f}" if math.isfinite(x) else "nan"


def ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


def verdict(value: float, limit: float) -> str:
    return "PASS" if math.isfinite(value) and value <= limit else "FAIL"


def _libc() -> Any | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold (64 MiB) and never auto-trim.

    By default glibc serves large blocks with mmap and raises the threshold only as such blocks are freed, so the
    first steps of a process map, fault in and unmap every activation: on the 2-core VM this was measured at
    ~13 s per step for the first 3 steps, then 0.4 s. Fixing the threshold makes the steady state start at
    step 1; it changes nothing for the steady state that the ratios compare. ``MALLOC_MMAP_THRESHOLD_`` in the
    environment does the same for a training run.
    """
    libc = _libc()
    if libc is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


class MemoryProbe:
    """Peak memory of a stretch of code: CUDA allocator peak, or CPU peak RSS (VmHWM reset via clear_refs)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.libc = _libc()
        self.can_reset = self.cuda or self._try_reset_hwm()
        self.peaks: list[float] = []
        self.deltas: list[float] = []
        self._base = 0.0

    @staticmethod
    def _status(key: str) -> float:
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
        return float(match[1]) * 1024 if match else math.nan

    @staticmethod
    def _try_reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = float(torch.cuda.memory_allocated())
            return
        if self.libc is not None:
            self.libc.malloc_trim(0)  # hand freed heap pages back, so that the peak is this step's, not history
        if self.can_reset:
            self._try_reset_hwm()
            self._base = self._status("VmRSS")
        else:  # no reset possible: process-lifetime maximum
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = float(torch.cuda.max_memory_allocated())
        elif self.can_reset:
            peak = self._status("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
        self.peaks.append(peak)
        self.deltas.append(peak - self._base)

    @property
    def kind(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated"
        return "peak RSS (VmHWM reset per step)" if self.can_reset else "process max RSS (no reset available)"


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    cfg: Any
    module: GridModule
    batch: dict[str, Any]
    layout: GridLayout
    flux_config: dict[str, Any]
    precision: str
    clip: float | None
    alpha: float
    tmp: Path
    malloc_tuned: bool = False
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def compose_cfg(tmp: Path, device: torch.device, steps: int) -> Any:
    """The real configs, as ``gridgen.train`` composes them (tiny model group; the weights are built here)."""
    register_resolvers()
    overrides = [f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run", "logger=none", "model=flux_tiny",
                 f"strategy={'gpu' if device.type == 'cuda' else 'cpu'}", "trainer.enable_progress_bar=false",
                 f"trainer.max_steps={steps}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def build_bench(args: argparse.Namespace, tmp: Path) -> Bench:
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    flux_config = QUICK_FLUX_CONFIG if args.quick else BENCH_FLUX_CONFIG
    layout = QUICK_LAYOUT if args.quick else BENCH_LAYOUT
    cfg = compose_cfg(tmp, device, args.warmup + args.steps + 1)

    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, seed=cfg.seed,
                        max_steps=cfg.trainer.max_steps)
    # configure_model minus from_pretrained: a random transformer of the benchmark's size, adopted by the module
    # (frozen base in `dtype`, LoRA with its seeded init, adapters in fp32); batches carry cached conditioning.
    torch.manual_seed(args.seed)
    module.adopt_transformer(FluxTransformer2DModel(**flux_config).to(dtype))

    gen = torch.Generator().manual_seed(args.seed)
    b, seq = args.batch_size, int(cfg.model.max_sequence_length)
    batch = {
        "__key__": [f"bench-{i:04d}" for i in range(b)],
        "caption": [layout.caption("a red ball moves right") for _ in range(b)],  # the datamodule always has it
        "layout": layout.to_dict(),
        "latents": torch.randn(b, layout.num_tokens, flux_config["in_channels"], generator=gen),
        "prompt_embeds": torch.randn(b, seq, flux_config["joint_attention_dim"], generator=gen),
        "pooled_prompt_embeds": torch.randn(b, flux_config["pooled_projection_dim"], generator=gen),
    }
    precision = "32-true" if dtype == torch.float32 else "bf16-mixed"
    clip = cfg.trainer.get("gradient_clip_val")
    alpha = float(cfg.callbacks.alpha.alpha_max)
    return Bench(args, device, dtype, cfg, module, batch, layout, flux_config, precision,
                 float(clip) if clip else None, alpha, tmp)


# ---------------------------------------------------------------------------------------------- the two loops
class RepeatBatch(torch.utils.data.IterableDataset):
    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.batch


class StepClock(L.Callback):
    """Records ``perf_counter`` at every ``on_train_batch_start`` (put first in the callback list)."""

    def __init__(self, sync: Callable[[], None], probe: MemoryProbe | None = None, probe_steps: tuple = ()) -> None:
        self.sync, self.probe, self.probe_steps = sync, probe, probe_steps
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.sync()
        self.starts.append(time.perf_counter())
        if self.probe is not None and batch_idx in self.probe_steps:
            self.probe.start()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.probe is not None and batch_idx in self.probe_steps:
            self.probe.stop()


def lightning_block(bench: Bench, warmup: int, steps: int, probe: MemoryProbe | None = None,
                    extra: tuple[L.Callback, ...] = ()) -> list[float]:
    """``trainer.fit`` for warmup + steps + 1 steps; returns the ``steps`` timed start-to-start intervals."""
    cfg = bench.cfg
    clock = StepClock(bench.sync, probe, tuple(range(warmup, warmup + steps)) if probe else ())
    callbacks = [clock, *(instantiate(cfg.callbacks[name]) for name in RUN_CALLBACKS), *extra]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_steps=warmup + steps + 1, precision=bench.precision,
        default_root_dir=str(bench.tmp / "run"),
    )
    loader = torch.utils.data.DataLoader(RepeatBatch(bench.batch), batch_size=None, num_workers=0)
    trainer.fit(bench.module, train_dataloaders=loader)
    intervals = [b - a for a, b in zip(clock.starts, clock.starts[1:], strict=False)]
    return intervals[warmup:warmup + steps]


class BareLoop:
    """zero_grad -> compute_losses -> backward -> clip -> AdamW.step -> zero_grad -> LR scheduler step, on the
    same module, with the AdamW and schedule of its configure_optimizers()."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        module = bench.module
        module.to(bench.device).train()  # Lightning's teardown leaves the module on the CPU
        optim = module.configure_optimizers()  # the same AdamW (and LR schedule) that Lightning gets
        self.optimizer = optim["optimizer"]
        self.scheduler = optim["lr_scheduler"]["scheduler"]
        self.params = module.trainable_parameters()

    def step(self) -> float:
        bench = self.bench
        bench.sync()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)  # no-op here; inside a fit it drops Lightning's gradients
        with bench.autocast():
            out = bench.module.compute_losses(bench.batch)
        out["loss"].backward()
        if bench.clip:
            torch.nn.utils.clip_grad_norm_(self.params, bench.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        bench.sync()
        return time.perf_counter() - start


def bare_block(bench: Bench, warmup: int, steps: int, probe: MemoryProbe | None = None) -> list[float]:
    loop = BareLoop(bench)
    bench.module.alpha = bench.alpha
    times = []
    for i in range(warmup + steps):
        if probe is not None and i >= warmup:
            probe.start()
        elapsed = loop.step()
        if probe is not None and i >= warmup:
            probe.stop()
        if i >= warmup:
            times.append(elapsed)
    return times


@contextlib.contextmanager
def flow_skipped() -> Iterator[None]:
    """compute_losses with L_flow not computed at all (what skipping it at alpha = 0 would cost)."""
    original = module_lib.temporal_flow_loss
    module_lib.temporal_flow_loss = lambda pred, target, layout: pred.new_zeros((), dtype=torch.float32)
    try:
        yield
    finally:
        module_lib.temporal_flow_loss = original


def flow_variants(bench: Bench) -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
    def with_alpha(value: float, skip: bool) -> Callable[[], contextlib.AbstractContextManager]:
        @contextlib.contextmanager
        def ctx() -> Iterator[None]:
            bench.module.alpha = value
            with flow_skipped() if skip else contextlib.nullcontext():
                yield
        return ctx

    return {
        f"alpha={bench.alpha:g} (L_base + alpha L_flow)": with_alpha(bench.alpha, False),
        "alpha=0 as implemented (L_flow computed, weighted 0)": with_alpha(0.0, False),
        "L_base only (L_flow not computed)": with_alpha(0.0, True),
    }


# ---------------------------------------------------------------------------------------------- measurements
class PairedBareStep(L.Callback):
    """Runs one bare-loop step (its own AdamW, same module) after every Lightning step: A B A B step by step.

    The Lightning step's interval (start to next start) then holds this bare step too; it is subtracted.
    """

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.loop: BareLoop | None = None
        self.times: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.loop = BareLoop(self.bench)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert self.loop is not None
        with torch.enable_grad():
            self.times.append(self.loop.step())


class LogCost(L.Callback):
    """Times ``LightningModule.log`` (on_step, a 0-d tensor) inside a fit, as training_step calls it 4 times a
    step and on_before_optimizer_step once."""

    def __init__(self, warmup: int, calls: int) -> None:
        self.warmup, self.calls = warmup, calls
        self.per_call: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx < self.warmup:
            return
        value = torch.zeros((), device=pl_module.device)
        start = time.perf_counter()
        for _ in range(self.calls):
            pl_module.log("bench/log_cost", value, on_step=True, on_epoch=False, batch_size=1)
        self.per_call.append((time.perf_counter() - start) / self.calls)


def measure_framework(bench: Bench) -> dict[str, Any]:
    """Separate fits and bare loops in interleaved blocks, then both interleaved step by step in one fit."""
    a = bench.args
    paired_cb = PairedBareStep(bench)
    n = a.repeats * a.steps
    intervals = lightning_block(bench, a.warmup, n, extra=(paired_cb,))
    paired_bare = paired_cb.times[a.warmup:a.warmup + n]
    paired_light = [t - b for t, b in zip(intervals, paired_bare, strict=True)]
    pair_ratios = [ratio(x, y) for x, y in zip(paired_light, paired_bare, strict=True)]
    chunks = [slice(i * a.steps, (i + 1) * a.steps) for i in range(a.repeats)]
    paired_ratios = [median(pair_ratios[c]) for c in chunks]
    log.info("framework step by step: gridgen %s ms, bare %s ms", ms(median(paired_light)), ms(median(paired_bare)))
    # neighbours in time share the machine's load: the median of per-pair ratios is robust to its drift
    paired = {"lightning": paired_light, "bare": paired_bare, "ratios": paired_ratios, "ratio": median(pair_ratios)}

    lightning, bare, ratios = [], [], []
    for rep in range(a.repeats):
        order = ("lightning", "bare") if rep % 2 == 0 else ("bare", "lightning")
        block: dict[str, list[float]] = {}
        for name in order:
            fn = lightning_block if name == "lightning" else bare_block
            block[name] = fn(bench, a.warmup, a.steps)
            log.info("framework repeat %d %-9s median %s ms", rep, name, ms(median(block[name])))
        lightning += block["lightning"]
        bare += block["bare"]
        ratios.append(ratio(median(block["lightning"]), median(block["bare"])))
    return {"lightning": lightning, "bare": bare, "ratios": ratios, "ratio": median(ratios), "paired": paired}


def measure_flow(bench: Bench) -> dict[str, Any]:
    a = bench.args
    variants = flow_variants(bench)
    names = list(variants)
    loop = BareLoop(bench)
    per_repeat: list[dict[str, list[float]]] = [{n: [] for n in names} for _ in range(a.repeats)]
    for cycle in range(a.warmup + a.repeats * a.steps):
        rot = cycle % len(names)
        for name in names[rot:] + names[:rot]:  # rotating order: no variant always runs first
            with variants[name]():
                elapsed = loop.step()
            if cycle >= a.warmup:
                per_repeat[(cycle - a.warmup) // a.steps][name].append(elapsed)
    flow, alpha0, base = names
    times = {n: [t for rep in per_repeat for t in rep[n]] for n in names}

    def pair_ratios(a_: str, b_: str) -> tuple[float, list[float]]:
        """Median over cycles of per-cycle ratios (the steps of one cycle ran back to back), overall and per repeat."""
        per = [[ratio(x, y) for x, y in zip(rep[a_], rep[b_], strict=True)] for rep in per_repeat]
        return median([r for rep in per for r in rep]), [median(rep) for rep in per]

    r_flow, r_flow_rep = pair_ratios(flow, base)
    r_alpha0, r_alpha0_rep = pair_ratios(flow, alpha0)
    r_impl, _ = pair_ratios(alpha0, base)
    bench.module.alpha = bench.alpha
    return {"names": names, "times": times, "ratio_flow_vs_base": r_flow, "ratios_flow_vs_base": r_flow_rep,
            "ratio_flow_vs_alpha0": r_alpha0, "ratios_flow_vs_alpha0": r_alpha0_rep, "ratio_alpha0_vs_base": r_impl}


def timeit_interleaved(fns: dict[str, Callable[[], Any]], rounds: int, inner: int, sync: Callable[[], None]
                       ) -> dict[str, tuple[float, float]]:
    """(median, best) seconds per call of each function over ``rounds`` of ``inner`` calls, rotating the order.

    The best round is the contention-free cost (as ``timeit`` reports it): on a shared 2-core machine a
    multi-threaded op of a few microseconds can wait a whole time slice for a pre-empted worker thread.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for fn in fns.values():  # warm
        fn()
    for r in range(rounds):
        rot = r % len(names)
        for name in names[rot:] + names[:rot]:
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            sync()
            samples[name].append((time.perf_counter() - start) / inner)
    return {n: (median(v), min(v)) for n, v in samples.items()}


def measure_losses(bench: Bench) -> dict[str, float]:
    """L_base vs L_base + alpha L_flow, forward + backward, on (B, N, 64) tensors like the transformer's output."""
    gen = torch.Generator().manual_seed(bench.args.seed + 1)
    shape = (bench.args.batch_size, bench.layout.num_tokens, bench.flux_config["in_channels"])
    pred = torch.randn(shape, generator=gen).to(bench.device, bench.dtype).requires_grad_(True)
    target = torch.randn(shape, generator=gen).to(bench.device)
    layout, alpha = bench.layout, bench.alpha

    def only_base() -> None:
        pred.grad = None
        base_loss(pred, target).backward()

    def with_flow() -> None:
        pred.grad = None
        (base_loss(pred, target) + alpha * temporal_flow_loss(pred, target, layout)).backward()

    rounds, inner = (5, 5) if bench.args.quick else (15, 20)
    res = timeit_interleaved({"base": only_base, "flow": with_flow}, rounds, inner, bench.sync)
    (base_med, base_best), (flow_med, flow_best) = res["base"], res["flow"]
    return {"base": base_med, "flow": flow_med, "base_best": base_best, "flow_best": flow_best,
            "ratio": ratio(flow_best, base_best), "ratio_median": ratio(flow_med, base_med),
            "extra": flow_best - base_best, "extra_median": flow_med - base_med, "rounds": rounds}


def measure_memory(bench: Bench) -> dict[str, Any]:
    """One measured step (after one warm step) per variant; the probe resets the peak at the step's start."""
    out: dict[str, Any] = {}
    probe = MemoryProbe(bench.device)
    lightning_block(bench, 1, 1, probe)
    out["gridgen Lightning step"] = (probe.peaks[-1], probe.deltas[-1])
    bare_block(bench, 1, 1, probe)
    out["bare loop step"] = (probe.peaks[-1], probe.deltas[-1])
    loop = BareLoop(bench)
    for name, ctx in flow_variants(bench).items():
        with ctx():
            loop.step()
            probe.start()
            loop.step()
            probe.stop()
        out[f"bare, {name}"] = (probe.peaks[-1], probe.deltas[-1])
    bench.module.alpha = bench.alpha
    out["_kind"] = probe.kind
    return out


def measure_checkpoint(bench: Bench) -> dict[str, float]:
    transformer = bench.module.transformer
    base = sum(p.numel() * p.element_size() for p in transformer.parameters() if not p.requires_grad)
    lora = sum(p.numel() * p.element_size() for p in transformer.parameters() if p.requires_grad)
    path = save_lora(bench.tmp / "lora", transformer, {"gridgen_bench": "1"})
    assert path.name == LORA_FILE
    return {"file": float(path.stat().st_size), "base": float(base), "lora_params": float(lora),
            "lora_numel": float(sum(p.numel() for p in transformer.parameters() if p.requires_grad))}


def measure_hot_path(bench: Bench) -> dict[str, Any]:
    """Pieces of GridModule's step outside the transformer, each timed on its own (median per call)."""
    module, batch, layout = bench.module, bench.batch, bench.layout
    module.to(bench.device)
    x0 = batch["latents"].to(bench.device)
    keys = list(batch["__key__"])
    b8 = 8
    x8 = torch.randn(b8, *x0.shape[1:], device=bench.device)
    keys8 = [f"bench-{i:04d}" for i in range(b8)]

    # GridModule._noise_and_times(keys, x0, layout[, stream]) as compute_losses calls it for a training step
    stream = {"stream": "train/0"} if "stream" in inspect.signature(module._noise_and_times).parameters else {}

    def noise_fn(keys: list[str], x: torch.Tensor) -> Callable[[], Any]:
        return lambda: module._noise_and_times(keys, x, layout, **stream)

    def batched_noise(x: torch.Tensor) -> Callable[[], Any]:
        def fn() -> Any:  # one generator, one randn for the whole batch: the floor for drawing the noise
            gen = torch.Generator(device=x.device).manual_seed(0)
            return torch.randn(x.shape, generator=gen, device=x.device), torch.rand(x.shape[0], generator=gen,
                                                                                     device=x.device)
        return fn

    # gradients for the grad-norm pieces
    loop = BareLoop(bench)
    with bench.autocast():
        out = module.compute_losses(batch)
    out["loss"].backward()
    params = loop.params

    def grad_norm_log() -> Any:  # the expression in GridModule.on_before_optimizer_step
        norms = [p.grad.detach().float().norm() for p in module.trainable_parameters() if p.grad is not None]
        return torch.stack(norms).norm()

    def clip() -> Any:
        return torch.nn.utils.clip_grad_norm_(params, float("inf"))  # the norm Lightning's clipping computes

    rounds, inner = (3, 3) if bench.args.quick else (9, 10)
    res = timeit_interleaved({
        "noise_and_times": noise_fn(keys, x0),
        "noise_batched": batched_noise(x0),
        "noise_and_times_b8": noise_fn(keys8, x8),
        "noise_batched_b8": batched_noise(x8),
        "image_ids": lambda: layout.image_ids(bench.device, bench.dtype),
        "trainable_parameters": module.trainable_parameters,
        "grad_norm_log": grad_norm_log,
        "clip_norm": clip,
    }, rounds, inner, bench.sync)
    loop.optimizer.zero_grad(set_to_none=True)
    log_cost = LogCost(warmup=1, calls=20 if bench.args.quick else 50)
    lightning_block(bench, 1, 2, extra=(log_cost,))
    res["self_log"] = (median(log_cost.per_call), min(log_cost.per_call))
    return {"times": res, "n_trainable_tensors": len(params), "rounds": rounds}


# ---------------------------------------------------------------------------------------------- report
def machine_info(device: torch.device) -> list[str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if match:
            cpu = match[1].strip()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    lines = [f"- CPU: {cpu}, {os.cpu_count()} logical cores ({usable} usable), torch threads: {torch.get_num_threads()}",
             f"- torch {torch.__version__}, lightning {L.__version__}, diffusers {diffusers.__version__}, "
             f"peft {peft.__version__}, Python {platform.python_version()}"]
    if device.type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    return lines


def render(bench: Bench, fw: dict, flow: dict, losses: dict, mem: dict, ckpt: dict, hot: dict,
           load: tuple[str, str], wall: float) -> tuple[str, str]:
    a, fc, layout = bench.args, bench.flux_config, bench.layout
    width = fc["num_attention_heads"] * fc["attention_head_dim"]
    key = f"{bench.device.type}-{a.dtype}-b{a.batch_size}" + ("-quick" if a.quick else "")
    cmd = "python bench/bench_train.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    bare_med = median(fw["bare"])
    lines = [
        f"### {bench.device.type} / {a.dtype} / batch {a.batch_size}" + (" (quick)" if a.quick else ""),
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{cmd}`",
        *machine_info(bench.device),
        f"- load average before / after: {load[0]} / {load[1]}; wall time {wall:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in bench.phases.items()) + "); "
        f"glibc malloc tuned: {'yes' if bench.malloc_tuned else 'no'}",
        f"- model: FluxTransformer2DModel {fc['num_layers']} double + {fc['num_single_layers']} single blocks, "
        f"{fc['num_attention_heads']} heads x {fc['attention_head_dim']} = width {width}, rope {tuple(fc['axes_dims_rope'])}, "
        f"guidance_embeds={fc['guidance_embeds']}, text {fc['joint_attention_dim']} x {bench.batch['prompt_embeds'].shape[1]} "
        f"tokens, pooled {fc['pooled_projection_dim']}; frozen base {a.dtype}, LoRA rank {bench.cfg.lora.rank} "
        f"({int(ckpt['lora_numel']):,} params, fp32) on {hot['n_trainable_tensors'] // 2} modules",
        f"- grid: layout {layout.name} of {layout.cell_height} px cells = {layout.height}x{layout.width} px = "
        f"{layout.token_rows}x{layout.token_cols} = {layout.num_tokens} tokens x {fc['in_channels']} channels; "
        f"precision {bench.precision}, gradient_clip_val {bench.clip}, AdamW lr {bench.cfg.optim.lr}",
        f"- timing: {a.repeats} repeats x {a.steps} steps per variant after {a.warmup} warm-up steps; medians. "
        "Ratios: variants interleaved step by step (1 B, 2): median of the per-pair ratios of neighbouring steps; "
        "in blocks (1 A): median over repeats of (median A / median B)",
        "",
        "#### 1. Framework overhead: gridgen (Lightning) step vs bare PyTorch loop",
        "",
        "| variant | median step (ms) | p25-p75 (ms) | steps | per-repeat medians (ms) |",
        "|---|---:|---:|---:|---|",
    ]
    paired = fw["paired"]
    per = max(1, len(fw["bare"]) // max(1, a.repeats))
    for name, data, key_ in (
            ("A. blocks: bare loop (zero_grad, compute_losses, backward, clip, AdamW, zero_grad, LR step)", fw, "bare"),
            ("A. blocks: gridgen, Trainer.fit + AlphaSchedule, GridThroughput, RunSummary", fw, "lightning"),
            ("B. one fit, step by step: bare step run after each Lightning step", paired, "bare"),
            ("B. one fit, step by step: gridgen step (interval minus that bare step)", paired, "lightning")):
        xs = data[key_]
        reps = [ms(median(xs[i:i + per])) for i in range(0, len(xs), per)]
        lines.append(f"| {name} | {ms(median(xs))} | {spread(xs)} | {len(xs)} | {', '.join(reps)} |")
    overhead_blocks = median(fw["lightning"]) - bare_med
    overhead = median([x - y for x, y in zip(paired["lightning"], paired["bare"], strict=True)])
    lines += [
        "",
        f"A: separate fits and bare loops in blocks, order alternating per repeat; per-repeat ratios "
        f"{', '.join(f'{r:.3f}' for r in fw['ratios'])}; Lightning adds {ms(overhead_blocks)} ms per step "
        "(difference of medians).",
        f"B: per-repeat medians of the per-pair ratios {', '.join(f'{r:.3f}' for r in paired['ratios'])}; "
        f"Lightning adds {ms(overhead)} ms per step (median of per-pair differences).",
        "",
        f"**ratio gridgen/bare (A, blocks) = {fw['ratio']:.3f}**",
        "",
        f"**ratio gridgen/bare (B, step by step) = {paired['ratio']:.3f}**",
        "",
        "#### 2. L_flow cost",
        "",
        "| variant (bare loop, interleaved step by step) | median step (ms) | p25-p75 (ms) | steps |",
        "|---|---:|---:|---:|",
    ]
    for name in flow["names"]:
        xs = flow["times"][name]
        lines.append(f"| {name} | {ms(median(xs))} | {spread(xs)} | {len(xs)} |")
    base_step = median(flow["times"][flow["names"][2]])
    lines += [
        "",
        f"Per-repeat medians of the per-cycle ratios alpha>0 / L_base only: "
        f"{', '.join(f'{r:.3f}' for r in flow['ratios_flow_vs_base'])}; "
        f"alpha=0 as implemented / L_base only: {flow['ratio_alpha0_vs_base']:.3f}.",
        "",
        f"| losses alone, forward + backward on (B, N, 64) | best of {losses['rounds']} (us) | median (us) |",
        "|---|---:|---:|",
        f"| L_base | {us(losses['base_best'])} | {us(losses['base'])} |",
        f"| L_base + alpha L_flow | {us(losses['flow_best'])} | {us(losses['flow'])} |",
        "",
        f"L_flow adds {us(losses['extra'])} us per step (median {us(losses['extra_median'])} us) = "
        f"{100 * ratio(losses['extra'], base_step):.2f} % of a {ms(base_step)} ms step.",
        "",
        f"**ratio step alpha>0 / L_base only = {flow['ratio_flow_vs_base']:.3f}**",
        "",
        f"**ratio step alpha>0 / alpha=0 = {flow['ratio_flow_vs_alpha0']:.3f}**",
        "",
        f"**ratio losses alone (L_base + L_flow) / L_base = {losses['ratio']:.3f}** (best of rounds; medians "
        f"{losses['ratio_median']:.3f})",
        "",
        "#### 3. Memory and LoRA checkpoint",
        "",
        f"Memory: {mem['_kind']}; delta = peak minus the level at the step's start (weights, optimiser state "
        "and batch are already there).",
        "",
        "| step | peak (MiB) | delta over step start (MiB) |",
        "|---|---:|---:|",
    ]
    for name, value in mem.items():
        if not name.startswith("_"):
            lines.append(f"| {name} | {mib(value[0])} | {mib(value[1])} |")
    mem_l, mem_b = mem["gridgen Lightning step"], mem["bare loop step"]
    flow_names = [n for n in mem if n.startswith("bare, ")]
    mem_f, mem_base = mem[flow_names[0]], mem[flow_names[2]]
    lines += [
        "",
        "| weights | bytes | MiB |",
        "|---|---:|---:|",
        f"| transformer parameters (frozen base, {a.dtype}) | {int(ckpt['base']):,} | {mib(ckpt['base'])} |",
        f"| LoRA parameters (fp32, in memory) | {int(ckpt['lora_params']):,} | {mib(ckpt['lora_params'])} |",
        f"| LoRA file `{LORA_FILE}` (save_lora) | {int(ckpt['file']):,} | {mib(ckpt['file'])} |",
        "",
        f"**ratio peak gridgen/bare = {ratio(mem_l[0], mem_b[0]):.3f}** (step delta "
        f"{ratio(mem_l[1], mem_b[1]):.3f})",
        "",
        f"**ratio peak alpha>0 / L_base only = {ratio(mem_f[0], mem_base[0]):.3f}** (step delta "
        f"{ratio(mem_f[1], mem_base[1]):.3f})",
        "",
        f"**ratio LoRA file / transformer parameters = {ratio(ckpt['file'], ckpt['base']):.4f}**",
        "",
        "#### 4. GridModule hot path (outside the transformer)",
        "",
        f"Each piece timed alone, per call: best of {hot['rounds']} rounds and median; % of the bare step "
        f"({ms(bare_med)} ms), from the best.",
        "",
        "| piece | best (us) | median (us) | % of step |",
        "|---|---:|---:|---:|",
    ]
    t = hot["times"]
    rows = [
        (f"_noise_and_times, B={a.batch_size} (one torch.Generator + crc32 per sample, CPU then .to(device))",
         t["noise_and_times"]),
        (f"  floor: one generator, one batched randn + rand, B={a.batch_size}", t["noise_batched"]),
        ("_noise_and_times, B=8", t["noise_and_times_b8"]),
        ("  floor: batched, B=8", t["noise_batched_b8"]),
        ("layout.image_ids (rebuilt every step)", t["image_ids"]),
        ("trainable_parameters() (walks all parameters)", t["trainable_parameters"]),
        (f"grad-norm logging in on_before_optimizer_step ({hot['n_trainable_tensors']} tensors, includes "
         "trainable_parameters())", t["grad_norm_log"]),
        ("  the same norm as computed again by gradient clipping", t["clip_norm"]),
        ("one LightningModule.log call (5 per step: 4 in training_step, 1 in on_before_optimizer_step)",
         t["self_log"]),
    ]
    for name, (med, best) in rows:
        lines.append(f"| {name} | {us(best)} | {us(med)} | {100 * ratio(best, bare_med):.2f} |")
    lines.append(f"| all Lightning overhead (section 1 B: median gridgen minus bare step) | | {us(overhead)} | "
                 f"{100 * ratio(overhead, bare_med):.2f} |")
    flow_estimate = ratio(base_step + losses["extra"], base_step)
    lines += [
        "",
        "#### Targets",
        "",
        "| check | measured | target | result |",
        "|---|---:|---:|---|",
        f"| gridgen step / bare step (A, blocks) | {fw['ratio']:.3f} | <= {TARGET_FRAMEWORK} | "
        f"{verdict(fw['ratio'], TARGET_FRAMEWORK)} |",
        f"| gridgen step / bare step (B, step by step) | {paired['ratio']:.3f} | <= {TARGET_FRAMEWORK} | "
        f"{verdict(paired['ratio'], TARGET_FRAMEWORK)} |",
        f"| step alpha>0 / alpha=0 (as implemented) | {flow['ratio_flow_vs_alpha0']:.3f} | <= {TARGET_FLOW} | "
        f"{verdict(flow['ratio_flow_vs_alpha0'], TARGET_FLOW)} |",
        f"| step alpha>0 / L_base only (true L_flow cost) | {flow['ratio_flow_vs_base']:.3f} | <= {TARGET_FLOW} | "
        f"{verdict(flow['ratio_flow_vs_base'], TARGET_FLOW)} |",
        f"| same, from the losses alone: (step + L_flow's extra) / step | {flow_estimate:.4f} | <= {TARGET_FLOW} | "
        f"{verdict(flow_estimate, TARGET_FLOW)} |",
    ]
    if bench.notes:
        lines += ["", "Notes:", *[f"- {n}" for n in bench.notes]]
    return key, "\n".join(lines)


# bench/RESULTS.md is shared with the other benchmarks: this script only touches its own section.
BEGIN, END = "<!-- bench:train:start -->", "<!-- bench:train:end -->"
SECTION_INTRO = """## Training step: Lightning overhead, L_flow cost, memory, LoRA size

Written by `bench/bench_train.py` (`make bench`), one block per device / dtype / batch size; what is measured and
how is in the script's docstring. Ratios compare variants measured in the same process and interleaved, so they
hold on a shared machine where absolute times do not."""


def update_results(path: Path, key: str, block: str) -> None:
    """Replace this run's block inside the training section (created after the file's title if missing)."""
    text = path.read_text() if path.exists() else "# gridgen benchmarks\n"
    if BEGIN not in text or END not in text:
        section = f"{BEGIN}\n{SECTION_INTRO}\n{END}\n"
        lines = text.splitlines(keepends=True)
        if lines and lines[0].startswith("# "):  # right after the title
            text = lines[0] + "\n" + section + "\n" + "".join(lines[1:]).lstrip("\n")
        else:
            text = text.rstrip() + "\n\n" + section
    head, rest = text.split(BEGIN, 1)
    section, tail = rest.split(END, 1)
    sub_begin, sub_end = f"<!-- train:{key} -->", f"<!-- /train:{key} -->"
    sub = f"{sub_begin}\n{block}\n{sub_end}"
    if sub_begin in section and sub_end in section:
        section = re.sub(re.escape(sub_begin) + r".*?" + re.escape(sub_end), lambda _: sub, section, flags=re.S)
    else:
        section = section.rstrip() + f"\n\n{sub}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + BEGIN + section + END + tail)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant and repeat (default 12; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps at the start of each block (default 2; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; quick 2)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="frozen base weights; bfloat16 trains with Lightning's bf16-mixed (autocast) like strategy=gpu")
    p.add_argument("--quick", action="store_true", help="tiny model and grid, few steps: a smoke run in seconds")
    p.add_argument("--no-write", action="store_true", help="print only, do not update the results file")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice; --quick: 1, which keeps the smoke run "
                        "fast when other processes hold the cores)")
    p.add_argument("--no-malloc-tune", action="store_true", help="leave glibc's malloc thresholds alone")
    args = p.parse_args(argv)
    defaults = (3, 1, 2) if args.quick else (12, 2, 3)  # full: ~2 min on 2 idle cores
    for name, default in zip(("steps", "warmup", "repeats"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.quick and args.threads is None:
        args.threads = 1
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps, --repeats and --batch-size must be >= 1, --warmup >= 0")
    return args


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*does not have many workers.*", ".*flops_per_batch.*", ".*LightningModule.*trainer.*",
                    ".*LeafSpec.*", ".*TF32.*", ".*validation_step.*val_dataloader.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on .to(dtype)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    quiet()
    notes: list[str] = []
    if args.device == "cuda" and not torch.cuda.is_available():
        log.warning("--device cuda: CUDA is not available, measuring on the CPU")
        args.device = "cpu"
        notes.append("--device cuda was asked for but CUDA was not available: measured on the CPU")
    malloc_tuned = not args.no_malloc_tune and args.device == "cpu" and tune_malloc()
    if malloc_tuned:
        notes.insert(0, f"glibc malloc tuned for the run (mmap threshold {MALLOC_MMAP_THRESHOLD >> 20} MiB, no "
                        "auto-trim; see tune_malloc): without it the first steps of a process are many times slower")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gridgen-bench-") as tmp:
        bench = build_bench(args, Path(tmp))
        bench.notes += notes
        bench.malloc_tuned = malloc_tuned
        phases: dict[str, float] = {"setup": time.perf_counter() - start}

        def phase(name: str, fn: Callable[[Bench], Any]) -> Any:
            t0 = time.perf_counter()
            log.info("%s ...", name)
            result = fn(bench)
            phases[name] = time.perf_counter() - t0
            return result

        # the process's first steps, before any timed block
        phase("warm-up", lambda b: bare_block(b, max(1, args.warmup), 0))
        fw = phase("framework", measure_framework)
        flow = phase("L_flow", measure_flow)
        losses = phase("losses", measure_losses)
        hot = phase("hot path", measure_hot_path)
        mem = phase("memory", measure_memory)
        ckpt = phase("checkpoint", measure_checkpoint)
        threads_after = torch.get_num_threads()
    wall = time.perf_counter() - start
    bench.phases = phases
    if args.threads is None and threads_after != torch.get_num_threads():
        bench.notes.append(f"torch threads changed during the run (now {threads_after})")
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    with contextlib.suppress(ValueError, AttributeError):
        busiest = max(float(load_before.split()[0]), float(load_after.split()[0]))
        cores = len(os.sched_getaffinity(0))
        if busiest > 0.75 * cores:
            bench.notes.append(f"the machine was shared (1-min load average up to {busiest:g} on {cores} cores): "
                               "absolute times are inflated and noisy (a multi-threaded op waits for pre-empted "
                               "worker threads), block ratios (1 A) are unreliable; rerun on a quiet machine")
    key, section = render(bench, fw, flow, losses, mem, ckpt, hot, (load_before, load_after), wall)
    print(section, flush=True)
    if args.no_write:
        return 0
    if args.quick and args.output == DEFAULT_OUTPUT:
        log.info("--quick: not writing %s (smoke-run figures); pass --output to write them elsewhere", args.output)
        return 0
    update_results(args.output, key, section)
    log.info("updated %s (section %s)", args.output, key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
