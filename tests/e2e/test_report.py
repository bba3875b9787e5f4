"""`python -m gridgen.report` without a run: one line, exit 2."""

import subprocess
import sys


def test_report_without_run_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gridgen.report"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "gridgen.report: error: run= is not set; pass run=<run folder or sweep folder>, e.g. make report "
        "run=outputs/runs/<date>/<time>_coarse-t2v-flux_tiny"]
