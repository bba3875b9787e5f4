"""bench/harness.py, shared by every benchmark: a run writes only its own block of the shared bench/RESULTS.md;
tables and PASS/FAIL verdicts read as written; statistics are the plain ones."""

import statistics

from tests.helpers.bench import load_bench


def test_write_block_replaces_only_its_own_block(tmp_path):
    h = load_bench("harness")
    path = tmp_path / "RESULTS.md"
    others = "# gridgen benchmarks\n\n<!-- bench:prepare:start -->\nprepare numbers\n<!-- bench:prepare:end -->\n"
    path.write_text(others)
    intro = "## Evaluation: I3D feature extraction"
    h.write_block(path, "eval", "cpu run 1", "cpu", intro)
    h.write_block(path, "eval", "gpu run", "cuda", intro)
    h.write_block(path, "eval", "cpu run 2", "cpu", intro)
    h.write_block(path, "data", "whole data section", None, "## Data")
    h.write_block(path, "data", "data again", None, "## Data")
    text = path.read_text()
    assert text.startswith(others.rstrip())  # the other sections are untouched
    assert text.count("<!-- bench:eval:start -->") == 1 and text.count("<!-- bench:eval:end -->") == 1
    section = text.split("<!-- bench:eval:start -->", 1)[1].split("<!-- bench:eval:end -->", 1)[0]
    assert "cpu run 2" in section and "cpu run 1" not in section and "gpu run" in section
    assert section.count(intro) == 1 and section.index(intro) < section.index("<!-- eval:cuda -->")
    assert section.index("<!-- eval:cpu -->") < section.index("<!-- eval:cuda -->")  # replaced in place
    data = text.split("<!-- bench:data:start -->", 1)[1].split("<!-- bench:data:end -->", 1)[0]
    assert data.strip() == "data again"


def test_table_verdict_and_statistics():
    h = load_bench("harness")
    assert h.table(["a", "b"], [[1, "x"]], "lr") == ["| a | b |", "|---|---:|", "| 1 | x |"]
    assert h.verdict(1.04, 1.05) == "PASS" and h.verdict(1.06, 1.05) == "FAIL"
    assert h.verdict(0.8, 0.7, higher_is_better=True) == "PASS" and h.verdict(float("nan"), 1.0) == "FAIL"
    assert h.target_row("x / y", 1.0234, 1.05) == ["x / y", "1.023", "<= 1.05", "PASS"]
    xs = [0.3, 0.1, 0.2, 0.5, 0.4]
    assert h.median(xs) == statistics.median(xs)
    q = statistics.quantiles(xs, n=4)
    assert h.quartiles(xs) == (q[0], q[2])
    assert h.pair_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    assert h.rotation(["a", "b", "c"], 1) == ["b", "c", "a"]


def test_interleaved_rotates_and_counts():
    h = load_bench("harness")
    calls = []
    out = h.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2, warmup=1,
                        calls=2)
    assert calls == ["a", "a", "a", "b", "b", "b", "b", "b", "b", "a", "a", "a"]
    assert [len(r) for r in out["a"]] == [2, 2] and all(t >= 0 for r in out["b"] for t in r)

