"""Smoke run of the training benchmark: `bench/bench_train.py --quick --no-write` works and reports finite ratios."""

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("# 1. Framework overhead", "# 2. L_flow cost", "# 3. Memory and LoRA checkpoint")


def test_bench_quick_smoke():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--quick", "--no-write"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 30, f"--quick took {elapsed:.1f} s"
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
