#!/usr/bin/env python
"""The differences between a finished `make mini` folder's variants, paired by seed: the table `report.md` carries
since this script was written (gridgen.mini.report.paired), for the folders made before.

    python experiments/mini/analysis/paired.py outputs/mini

Reads every ``<out>/<variant>/seed<k>/done.json`` (the variants in the order of ``report.md``'s table, which is the
order of ``runs.variants``; ``settings.json`` keeps them sorted by name); prints the markdown table. Exit 2 with one line where ``<out>`` is not a finished `make mini` folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gridgen.mini.report import paired, paired_markdown
from gridgen.mini.steps import read_done


def records_of(out: Path) -> dict[str, list[dict]]:
    names = [*json.loads((out / "settings.json").read_text())["runs"]["variants"], "base_without_lora"]
    report = (out / "report.md").read_text()
    variants = sorted((n for n in names if f"\n| {n} |" in report), key=lambda n: report.index(f"\n| {n} |"))
    records = {}
    for variant in variants:
        cells = sorted((out / variant).glob("seed*/done.json"), key=lambda p: int(p.parent.name[4:]))
        if cells:
            records[variant] = [read_done(cell.parent) for cell in cells]
    return records


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not all((Path(argv[0]) / name).is_file() for name in ("settings.json", "report.md")):
        print(f"paired.py: error: {argv[0] if argv else '<out>'} is not a finished `make mini` folder (no "
              "settings.json and report.md); pass the folder make mini wrote, e.g. outputs/mini", file=sys.stderr)
        return 2
    print(paired_markdown(paired(records_of(Path(argv[0])))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
