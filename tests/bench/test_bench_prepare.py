"""bench/bench_prepare.py --quick: its RESULTS.md section and ratios."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from tests.helpers.paths import ROOT


@pytest.mark.slow  # a benchmark's smoke: make bench / make test-slow
def test_bench_prepare_quick_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_prepare.py"), "--quick", "--no-write"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("## Prepare throughput (`bench/bench_prepare.py`)"), out[:300]  # the RESULTS.md section
    ratios = [float(v) for v in re.findall(r"\*\*ratio [^=*]+= ([\d.]+)\*\*", out)]
    assert len(ratios) == 3 and all(math.isfinite(r) and r > 0 for r in ratios), out
