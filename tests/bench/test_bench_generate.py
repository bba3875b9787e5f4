"""bench/bench_generate.py --quick: the ratio to diffusers and its own block of RESULTS.md."""

import math
import re

from tests.helpers.paths import ROOT


def test_bench_quick_and_results_section(tmp_path, capsys, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # its `import harness`, as `python bench/...`
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "bench" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "RESULTS.md"
    results.write_text("# benchmarks\n\n<!-- bench:cpu-float32-b1 -->\ntraining numbers\n<!-- /bench:cpu-float32-b1 -->\n")
    for _ in range(2):  # a second run replaces its own block only
        assert bench.main(["--quick", "--layouts", "4x4", "--output", str(results)]) == 0
    out = capsys.readouterr().out
    ratio = float(re.search(r"\*\*ratio gridgen/diffusers \(worst layout\) = ([\d.]+)\*\*", out)[1])
    assert math.isfinite(ratio) and ratio > 0
    assert re.search(r"\| 4x4 \| 128x128 \| 64 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \([\d.]+-[\d.]+\) \| 0\.0e\+00 \|", out)
    text = results.read_text()
    assert text.startswith("# benchmarks\n\n<!-- bench:cpu-float32-b1 -->\ntraining numbers\n")
    assert text.count("<!-- bench:generate:start -->") == 1 and text.count("<!-- generate:tiny-cpu-float32 -->") == 1
    assert text.rstrip().endswith("<!-- bench:generate:end -->")
