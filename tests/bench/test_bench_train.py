"""Smoke runs of the training benchmark: `bench/bench_train.py --quick --no-write` reports finite ratios in every
section, and a variant this machine cannot run is reported as skipped, not fatal."""

import math
import os
import re
import subprocess
import sys
import time

import pytest

from tests.helpers.bench import load_bench
from tests.helpers.paths import ROOT

SECTIONS = ("# 1. Framework overhead", "# 2. L_flow cost", "# 3. Memory and LoRA checkpoint")


def run_bench(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--quick", "--no-write", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    return proc, time.perf_counter() - start


def variant_rows(out: str) -> dict[str, list[str]]:
    section = out.split("#### 5. Variants", 1)[1].split("####", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]
    return {row[0]: row[1:] for row in rows[1:]}  # past the header


@pytest.mark.slow  # a benchmark's smoke: make bench / make test-slow
def test_bench_quick_smoke():
    proc, elapsed = run_bench()
    assert proc.returncode == 0, proc.stderr[-3000:]
    # ~35 s on an idle 2-core machine (~25 s of it the malloc section's 4 child processes); the bound catches a smoke
    # run grown to full size (minutes), not load noise
    assert elapsed < 90, f"--quick took {elapsed:.1f} s"
    out = proc.stdout
    positions = [out.find(s) for s in SECTIONS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), out
    # every section reports at least one ratio, and every ratio is a finite positive number
    bounds = [*positions, out.find("# 4. GridModule hot path")]
    for name, begin, end in zip(SECTIONS, bounds, bounds[1:], strict=False):
        ratios = re.findall(r"\*\*ratio [^=*]+= ([^*\s]+)\*\*", out[begin:end])
        assert ratios, f"no ratio in section {name!r}"
        for value in ratios:
            assert math.isfinite(float(value)) and float(value) > 0, (name, value)
    targets = re.findall(r"^\| [^|]+ \| ([^|]+) \| <= [\d.]+ \| (PASS|FAIL) \|$", out, re.M)
    assert len(targets) >= 3 and all(math.isfinite(float(v)) for v, _ in targets), out
    step, ratio, tflops, mfu, memory = variant_rows(out)["baseline"]
    assert float(step) > 0 and float(ratio) == 1.0 and float(tflops) > 0 and math.isfinite(float(memory))
    assert mfu == "n/a"  # a CPU has no peak FLOP/s entry
    malloc = out.split("#### 6. glibc's malloc", 1)[1]  # child processes, tuned and glibc's defaults
    (value,) = re.findall(r"\*\*ratio defaults / tuned = ([^*\s]+)\*\*", malloc)
    assert math.isfinite(float(value)) and float(value) > 0


def test_a_variant_that_cannot_run_is_skipped(tmp_path, monkeypatch):
    bench_train = load_bench("bench_train")
    args = bench_train.parse_args(["--quick", "--no-write", "--sections", "variants", "--gradient-checkpointing",
                                   "--optim", "adamw8bit", "--steps", "2"])
    bench = bench_train.build_bench(args, tmp_path)
    build = bench_train.Bench.build_module

    def build_or_fail(self, model=None, optim=None):
        if (optim or {}).get("name") == "adamw8bit":  # as a missing bitsandbytes would
            raise ValueError("optim.name=adamw8bit needs bitsandbytes\nsecond line")
        return build(self, model, optim)

    monkeypatch.setattr(bench_train.Bench, "build_module", build_or_fail)
    result = bench_train.measure_variants(bench)
    assert result["skipped"] == {"optim adamw8bit": "ValueError: optim.name=adamw8bit needs bitsandbytes"}
    rows = variant_rows("\n".join(bench_train.render_variants(result, bench)))
    assert rows["optim adamw8bit"][0] == "skipped: ValueError: optim.name=adamw8bit needs bitsandbytes"
    assert float(rows["baseline"][1]) == 1.0 and float(rows["gradient checkpointing"][1]) > 0
    assert len(result["times"]["gradient checkpointing"]) == args.repeats * args.steps


def test_variants_differ_from_the_baseline_in_one_setting_even_where_the_preset_sets_it():
    bench_train = load_bench("bench_train")
    args = bench_train.parse_args(["--model", "mini", "--compile", "--gradient-checkpointing",
                                   "--optim", "adamw8bit"])
    variants = bench_train.requested_variants(args)
    # experiment=mini compiles: the baseline must not, or the compile variant would be measured against itself
    assert variants["baseline"] == {"model": {"compile": False, "gradient_checkpointing": False},
                                    "optim": {"name": "adamw"}}
    assert variants["compile (regional, repeated blocks)"]["model"] == {"compile": True,
                                                                        "gradient_checkpointing": False}
    assert variants["gradient checkpointing"]["model"] == {"compile": False, "gradient_checkpointing": True}
    assert variants["optim adamw8bit"] == {"model": {"compile": False, "gradient_checkpointing": False},
                                           "optim": {"name": "adamw8bit"}}
    assert bench_train.requested_variants(bench_train.parse_args(["--model", "mini"])) == {"baseline": {}}


@pytest.mark.slow  # a benchmark's usage (~12 s)
def test_bad_variant_flag_is_a_usage_error():
    proc, _ = run_bench("--quantization", "int3")
    assert proc.returncode == 2 and "invalid choice: 'int3'" in proc.stderr, proc.stderr[-2000:]
