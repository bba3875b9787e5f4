"""Evaluation results as files: ``<task>.json`` + ``<task>.md`` beside the paper's numbers, and sweep summaries.

The JSON's ``metrics`` holds plain numbers (``gridgen.report`` collects ``<run>/eval/*.json`` into a training
sweep's summary); ``n`` holds the sample count behind each number (FVD: real / generated), ``protocol`` how
each was computed and ``notes`` every adjustment made to the input (resizing, pairing, skipped metrics).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# our metric key -> the key of conf/paper_targets.yaml
PAPER_KEYS = {"fvd": "fvd", "is": "is", "clip_img": "clip_img", "clip_f": "clip_f", "clip_o": "clip_o", "psnr": "psnr",
              "ssim": "ssim", "time_per_sequence_s": "inference_time_s"}


@dataclass
class Evaluation:
    """What one evaluation found: numbers, their sample counts, protocol and stated adjustments."""

    task: str
    target: str
    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, str] = field(default_factory=dict)  # metric -> the "N" column (FVD: real / fake)
    protocol: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)


def paper_targets(path: Path, ev: Evaluation) -> dict[str, Any]:
    """The paper's rows for this task (``{variant: {metric: value}}`` + ``source``) from a targets YAML."""
    if not path.is_file():
        ev.notes.append(f"paper numbers not shown: '{path}' does not exist")
        return {}
    row = OmegaConf.to_container(OmegaConf.load(path), resolve=True).get(ev.target) or {}
    return {k: v for k, v in row.items() if isinstance(v, dict) or k == "source"}


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else (f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}")
    return str(value)


def render_table(ev: Evaluation, paper: dict[str, Any]) -> str:
    """Markdown: one row per metric, ours with its N, then the paper's rows for the task."""
    variants = [k for k in paper if k != "source"]
    header = ["metric", "ours", "N", *[f"paper: {v}" for v in variants]]
    lines = [f"## {ev.task}: gridgen vs paper ({paper.get('source', 'no paper numbers')})", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key, value in ev.metrics.items():
        if key in ("fvd_n_real", "fvd_n_fake"):
            continue
        paper_key = PAPER_KEYS.get(key)
        cells = [key, fmt(value), ev.counts.get(key, ev.counts.get(key.removesuffix("_std"), "")),
                 *[fmt(paper[v].get(paper_key)) if paper_key else "" for v in variants]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Inputs: generated {ev.inputs.get('fake')} ({ev.inputs.get('fake_videos')} videos), "
              f"real {ev.inputs.get('real')} ({ev.inputs.get('real_videos')} videos)."]
    if ev.protocol:
        lines += ["", "Protocol:", *[f"- {k}: {v}" for k, v in ev.protocol.items()]]
    if ev.notes:
        lines += ["", "Notes:", *[f"- {n}" for n in ev.notes]]
    return "\n".join(lines) + "\n"


def write_results(ev: Evaluation, out: Path, paper: dict[str, Any]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    record = {"task": ev.task, "target": ev.target, "metrics": ev.metrics, "n": ev.counts, "protocol": ev.protocol,
              "notes": ev.notes, "inputs": ev.inputs, "paper": paper}
    json_path, md_path = out / f"{ev.task}.json", out / f"{ev.task}.md"
    json_path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    md_path.write_text(render_table(ev, paper))
    return json_path, md_path


def write_sweep_summary(sweep: Path) -> Path:
    """``eval_summary.{md,csv,png}`` in a sweep folder: one row per job, one column per metric.

    A job's folder is Hydra's ``<num>_<override_dirname>``, nested where a swept value is a path
    (``0_eval.fake=runs/a/samples``): its results are found at any depth, named by that folder's relative path."""
    rows = []
    for path in sorted(sweep.rglob("*.json")):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and {"task", "metrics", "protocol"} <= set(record):
            rows.append({"job": path.parent.relative_to(sweep).as_posix(), "task": record["task"],
                         **{k: v for k, v in record["metrics"].items() if isinstance(v, int | float)}})
    if not rows:
        raise FileNotFoundError(f"sweep folder '{sweep}' has no evaluation results (*/<task>.json)")
    columns = ["job", "task", *sorted({k for r in rows for k in r} - {"job", "task"})]
    with (sweep / "eval_summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    table = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    table += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    text = f"# Evaluation sweep {sweep.name}\n\n" + "\n".join(table) + "\n"
    metrics = [c for c in columns[2:] if not c.startswith("fvd_n_") and any(c in r for r in rows)]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        text += "\n(no plot: matplotlib is not installed)\n"
    else:
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            ax.bar([r["job"] for r in rows], [r.get(metric, float("nan")) for r in rows])
            ax.set(title=metric, xlabel="sweep job", ylabel=metric)
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)  # no offset text over the title
            ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        fig.tight_layout()
        fig.savefig(sweep / "eval_summary.png", dpi=100)
        plt.close(fig)
        text += "\n![evaluation sweep](eval_summary.png)\n"
    (sweep / "eval_summary.md").write_text(text)
    return sweep / "eval_summary.md"
