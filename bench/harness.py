"""What every benchmark in bench/ shares: timing, statistics, the machine's description, bench/RESULTS.md.

- timing: ``sync`` (CUDA), ``timed``, ``interleaved`` (variants in blocks or call by call, rotating order so
  that no variant always runs first), ``best_and_median`` (timeit-style rounds);
- statistics: ``median``, ``quartiles``, ``pair_ratios`` (median of per-pair ratios of neighbouring
  measurements: robust to the drifting load of a shared machine), formatting in ms / us / MiB;
- memory: ``tune_malloc`` and ``MemoryProbe`` (CUDA allocator peak, or CPU peak RSS reset per measurement);
- the machine: ``environment_lines`` (CPU/GPU name, threads, library versions, load average);
- reporting: ``table``, ``verdict`` (PASS/FAIL against a target), ``write_block`` (replace one named block of
  one benchmark's section of bench/RESULTS.md, re-reading the shared file right before writing).

Scripts run as ``python bench/bench_<name>.py`` import it as ``harness`` (their folder is on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no torchvision notices from transformers' imports

import torch  # noqa: E402

from gridgen import runtime  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
MALLOC_MMAP_THRESHOLD, MALLOC_ENV = runtime.MALLOC_MMAP_THRESHOLD, runtime.MALLOC_ENV  # one home: gridgen.runtime


# ---------------------------------------------------------------------------------------------- timing
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Seconds of one call, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def rotation(names: Sequence[str], index: int) -> list[str]:
    """``names`` rotated by ``index``: round ``i`` starts with a different variant."""
    k = index % len(names)
    return [*names[k:], *names[:k]]


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 0, calls: int = 1,
                device: torch.device | str = "cpu") -> dict[str, list[list[float]]]:
    """Per variant and round, the seconds of each of ``calls`` timed calls (after ``warmup`` untimed ones
    per round); the variants take turns in a rotating order. ``calls=1`` interleaves call by call."""
    out: dict[str, list[list[float]]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in rotation(list(fns), r):
            for _ in range(warmup):
                fns[name]()
            out[name].append([timed(fns[name], device) for _ in range(calls)])
    return out


def best_and_median(fns: dict[str, Callable[[], Any]], rounds: int, inner: int,
                    device: torch.device | str = "cpu") -> dict[str, tuple[float, float]]:
    """(median, best) seconds per call over ``rounds`` of ``inner`` calls, rotating the order.

    The best round is the contention-free cost (as ``timeit`` reports it): on a shared 2-core machine a
    multi-threaded op of a few microseconds can wait a whole time slice for a pre-empted worker thread.
    """
    for fn in fns.values():  # warm
        fn()
    per_call = interleaved({n: (lambda f=f: [f() for _ in range(inner)]) for n, f in fns.items()}, rounds,
                           device=device)
    return {n: (median([r[0] / inner for r in v]), min(r[0] / inner for r in v)) for n, v in per_call.items()}


# ---------------------------------------------------------------------------------------------- statistics
def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else math.nan


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """(p25, p75); a single value is its own spread."""
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (math.nan, math.nan)
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


def pair_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Ratios of neighbouring measurements ``a[i] / b[i]``: they share the machine's load of that moment."""
    return [ratio(x, y) for x, y in zip(a, b, strict=True)]


def ms(x: float) -> str:
    return f"{x * 1e3:.1f}" if math.isfinite(x) else "nan"


def us(x: float) -> str:
    return f"{x * 1e6:.0f}" if math.isfinite(x) else "nan"


def mib(x: float) -> str:
    return f"{x / 2**20:.1f}" if math.isfinite(x) else "nan"


def spread_ms(xs: Sequence[float]) -> str:
    """``p25-p75`` of a sample of seconds, in ms."""
    if len(xs) < 2:
        return "-"
    low, high = quartiles(xs)
    return f"{low * 1e3:.1f}-{high * 1e3:.1f}"


# ---------------------------------------------------------------------------------------------- memory
_libc, tune_malloc = runtime.libc, runtime.tune_malloc  # what gridgen's CPU runs use too


def status_bytes(key: str) -> float:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    match = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    return float(match[1]) * 1024 if match else math.nan


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of a stretch of code: CUDA allocator peak, or CPU peak RSS (VmHWM reset via clear_refs)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.libc = _libc()
        self.can_reset = self.cuda or reset_peak_rss()
        self.peaks: list[float] = []
        self.deltas: list[float] = []
        self._base = 0.0

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
            reset_peak_rss()
            self._base = status_bytes("VmRSS")
        else:  # no reset possible: process-lifetime maximum
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0

    def stop(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            peak = float(torch.cuda.max_memory_allocated())
        elif self.can_reset:
            peak = status_bytes("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
        self.peaks.append(peak)
        self.deltas.append(peak - self._base)
        return peak

    @property
    def kind(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated"
        return "peak RSS (VmHWM reset at the start)" if self.can_reset else "process max RSS (no reset available)"


# ---------------------------------------------------------------------------------------------- the machine
def cpu_name() -> str:
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if match:
            return match[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """``torch.cuda.get_device_name`` on CUDA, the CPU's model name otherwise."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "?"


def command_line() -> str:
    """``python bench/<script> <args>`` as this process was started (script relative to the repository)."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT) else script.name
    return "python " + shlex.join([shown, *sys.argv[1:]])


def versions(packages: Iterable[str]) -> str:
    found = []
    for name in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{name} {importlib.metadata.version(name)}")
    return ", ".join([f"torch {torch.__version__}", *found, f"Python {platform.python_version()}"])


def environment_lines(device: torch.device | str, packages: Iterable[str] = ("diffusers",),
                      load_before: str | None = None) -> list[str]:
    """Markdown bullets: date, command, CPU/GPU, threads, versions, load average."""
    device = torch.device(device)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- command: `{command_line()}`",
             f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores ({usable} usable), torch threads: "
             f"{torch.get_num_threads()}"]
    if device.type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    lines.append(f"- {versions(packages)}")
    load = f"{load_before} / {load_average()}" if load_before is not None else load_average()
    lines.append(f"- load average{' before / after' if load_before is not None else ''}: {load}")
    return lines


def shared_machine_note(load_before: str) -> str | None:
    """A note when the 1-minute load average exceeded 3/4 of the usable cores during the run."""
    with contextlib.suppress(ValueError, IndexError, AttributeError):
        busiest = max(float(load_before.split()[0]), float(load_average().split()[0]))
        cores = len(os.sched_getaffinity(0))
        if busiest > 0.75 * cores:
            return (f"the machine was shared (1-min load average up to {busiest:g} on {cores} cores): absolute "
                    "times are inflated and noisy; ratios of interleaved variants hold better; rerun on a quiet "
                    "machine")
    return None


# ---------------------------------------------------------------------------------------------- reporting
def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """Markdown table lines; ``align`` has one letter per column (l or r, default l)."""
    align = align.ljust(len(header), "l")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def verdict(value: float, target: float, higher_is_better: bool = False) -> str:
    """PASS/FAIL of ``value`` against ``target`` (``<=`` target, or ``>=`` when higher is better)."""
    if not math.isfinite(value):
        return "FAIL"
    return "PASS" if (value >= target if higher_is_better else value <= target) else "FAIL"


def target_row(check: str, value: float, target: float, higher_is_better: bool = False, digits: int = 3) -> list[str]:
    """One row of a ``| check | measured | target | result |`` table."""
    sign = ">=" if higher_is_better else "<="
    return [check, f"{value:.{digits}f}", f"{sign} {target}", verdict(value, target, higher_is_better)]


def write_block(path: Path, bench: str, block: str, key: str | None = None, intro: str = "") -> None:
    """Put ``block`` into the ``bench`` section of the shared results file, leaving every other section alone.

    The section lies between ``<!-- bench:<bench>:start -->`` and ``<!-- bench:<bench>:end -->`` (appended at
    the end of the file when missing). ``key=None``: the block is the whole section. Otherwise the section is
    ``intro`` followed by blocks ``<!-- <bench>:<key> -->`` ... ``<!-- /<bench>:<key> -->`` (one per device,
    dtype, model ...); the block of ``key`` is replaced, or appended.
    """
    begin, end = f"<!-- bench:{bench}:start -->", f"<!-- bench:{bench}:end -->"
    text = path.read_text() if path.exists() else "# gridgen benchmarks\n"  # re-read right before writing
    if begin not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{intro}\n{end}\n"
    head, rest = text.split(begin, 1)
    section, tail = rest.split(end, 1)
    if key is None:
        section = f"\n{block.strip()}\n"
    else:
        sub_begin, sub_end = f"<!-- {bench}:{key} -->", f"<!-- /{bench}:{key} -->"
        sub = f"{sub_begin}\n{block.strip()}\n{sub_end}"
        if sub_begin in section and sub_end in section:
            pattern = re.escape(sub_begin) + r".*?" + re.escape(sub_end)
            section = re.sub(pattern, lambda _: sub, section, flags=re.S)
        else:
            section = section.rstrip() + f"\n\n{sub}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + begin + section + end + tail)


def finish(args: Any, bench: str, block: str, key: str | None = None, intro: str = "") -> None:
    """Print the block; write it into ``args.output`` unless ``--no-write``."""
    print(block, flush=True)
    if getattr(args, "no_write", False):
        return
    output = Path(getattr(args, "output", RESULTS))
    write_block(output, bench, block, key, intro)
    print(f"wrote {output} (section {bench}{'' if key is None else ', block ' + key})", file=sys.stderr)


def add_output_args(parser: Any, quick_help: str) -> None:
    """``--quick``, ``--no-write`` and ``--output``, the same in every benchmark."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--no-write", action="store_true", help="print only, do not update the results file")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results file (default bench/RESULTS.md)")


# ---------------------------------------------------------------------------------------------- models
# FLUX transformers with random weights, for timing (weights do not change the cost).
DEV_FLUX_CONFIG: dict[str, Any] = {  # black-forest-labs/FLUX.1-dev transformer/config.json
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
# FLUX.1-dev's layout at 2 + 2 blocks of 4 heads x 16: a CPU check of the dev-random code path
SMALL_FLUX_CONFIG: dict[str, Any] = {**DEV_FLUX_CONFIG, "num_layers": 2, "num_single_layers": 2,
                                     "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 64,
                                     "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)}


def random_transformer(config: dict[str, Any], device: torch.device | str, dtype: torch.dtype,
                       seed: int = 0) -> torch.nn.Module:
    """A ``FluxTransformer2DModel`` initialised directly on ``device`` in ``dtype`` (FLUX.1-dev's 12B parameters
    never exist in fp32 or on the CPU)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)


def describe_flux(config: dict[str, Any]) -> str:
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return (f"FluxTransformer2DModel {config['num_layers']} double + {config['num_single_layers']} single blocks, "
            f"{config['num_attention_heads']} heads x {config['attention_head_dim']} = width {width}, "
            f"rope {tuple(config['axes_dims_rope'])}, text {config['joint_attention_dim']}, pooled "
            f"{config['pooled_projection_dim']}")


def skip_reason(error: BaseException) -> str:
    """The first line of an exception, for a ``skipped: <reason>`` row."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}"
