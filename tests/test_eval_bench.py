"""bench/bench_eval.py writes only its own section of the shared bench/RESULTS.md, one block per device."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_eval", ROOT / "bench" / "bench_eval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_eval"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_update_results_replaces_only_its_own_block(tmp_path):
    bench = load_bench()
    path = tmp_path / "RESULTS.md"
    others = "# gridgen benchmarks\n\n<!-- bench:prepare:start -->\nprepare numbers\n<!-- bench:prepare:end -->\n"
    path.write_text(others)
    block = lambda key, text: f"<!-- eval:{key} -->\n{text}\n<!-- /eval:{key} -->"  # noqa: E731
    bench.update_results(path, "cpu", block("cpu", "cpu run 1"))
    bench.update_results(path, "cuda", block("cuda", "gpu run"))
    bench.update_results(path, "cpu", block("cpu", "cpu run 2"))
    text = path.read_text()
    assert text.startswith(others.rstrip())  # the other sections are untouched
    assert text.count(bench.BEGIN) == 1 and text.count(bench.END) == 1
    section = text.split(bench.BEGIN, 1)[1].split(bench.END, 1)[0]
    assert "cpu run 2" in section and "cpu run 1" not in section and "gpu run" in section
    assert section.count("## Evaluation") == 1
