"""bench/bench_data.py --quick: its ratios."""

from __future__ import annotations

import pytest

from tests.helpers.paths import ROOT


@pytest.mark.slow
def test_bench_data_quick_smoke():
    import re
    import subprocess
    import sys

    bench = ROOT / "bench" / "bench_data.py"
    proc = subprocess.run([sys.executable, str(bench), "--quick", "--no-write"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratios = [float(x) for x in re.findall(r"\*\*(?:ratio|speed-up|peak memory ratio) [^=*]+= ([0-9.]+)\*\*", proc.stdout)]
    assert len(ratios) == 3 and all(0 < r < 100 for r in ratios), proc.stdout
