"""Offline reports without W&B, behind ``python -m gridgen.report run=<run folder | sweep folder>``.

A run folder (``summary.json`` / ``metrics/metrics.csv``) gets ``report/``: loss curves, the alpha and
learning-rate schedule as PNG, the latest sample grids and a Markdown summary. A sweep folder (Hydra's
``multirun.yaml``) gets ``sweep_summary.{md,csv,png}``: per job final L_base, L_flow, trainable parameters,
step time, peak memory and any evaluation metrics, plus every job's own report. ``SweepReport`` writes the
sweep summary automatically at the end of a multirun.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import matplotlib
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

log = logging.getLogger(__name__)
LOSS_KEYS = ("train/loss", "train/loss_base", "train/loss_flow")
SWEEP_COLUMNS = ("job", "lora.rank", "final_loss_base", "final_loss_flow", "trainable_parameters", "step_time_s",
                 "peak_memory_mb")
SWEEP_LABELS = {"final_loss_base": "final L_base", "final_loss_flow": "final L_flow",  # plotted column: y label
                "trainable_parameters": "trainable parameters", "step_time_s": "step time (s)",
                "peak_memory_mb": "peak memory (MB)"}
RUN_HINT = "pass run=<run folder or sweep folder>, e.g. make report run=outputs/runs/<date>/<time>_coarse-t2v-flux_tiny"


# Keys that gridgen logs itself with ``step=trainer.global_step`` (steps done), not through ``self.log``.
LOGGED_AT_GLOBAL_STEP = ("data/",)


def read_metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics/metrics.csv`` (Lightning CSVLogger) -> {metric: [(step, value), ...]} at the run's own step.

    Lightning writes ``self.log`` values with the count of optimizer steps done *before* the current one (its
    ``_batches_that_stepped``, incremented after validation): the row of step 4 holds the loss of the run's 5th
    step, the row of step 19 the validation after step 20. Those rows are moved to ``step + 1``, the step the
    run's console, checkpoints and ``summary.json`` name; keys in :data:`LOGGED_AT_GLOBAL_STEP` are already there.
    """
    path = run / "metrics" / "metrics.csv"
    series: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return series
    with path.open() as f:
        for row in csv.DictReader(f):
            logged = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    step = logged if key.startswith(LOGGED_AT_GLOBAL_STEP) else logged + 1
                    series.setdefault(key, []).append((step, float(value)))
    return series


def is_run(path: Path) -> bool:
    return (path / "summary.json").is_file() or (path / "metrics" / "metrics.csv").is_file()


def is_sweep(path: Path) -> bool:
    return (path / "multirun.yaml").is_file()


def plain_number(value: float, _pos: int | None = None) -> str:
    """Tick text as a plain number (``2.6``, ``0.05``, ``120000``), never ``2.6x10^0`` or an offset."""
    return f"{value:.10g}"


class PlainLogFormatter(ticker.LogFormatter):
    """Matplotlib's choice of which log ticks to label, written as plain numbers."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return plain_number(x) if super().__call__(x, pos) else ""


def plain_log_axis(axis: Any) -> None:
    """Label a log-scaled axis with plain numbers (minor ticks too when it spans less than a few decades)."""
    axis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def plot_series(series: dict[str, list[tuple[int, float]]], keys: list[str], title: str, ylabel: str,
                logy: bool = False) -> plt.Figure | None:
    """One line per metric over the training step (None when none of ``keys`` has values)."""
    keys = [k for k in keys if series.get(k)]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        steps, values = zip(*series[key], strict=True)
        ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
    else:
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(plain_number))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _save(fig: plt.Figure | None, out: Path) -> Path | None:
    if fig is None:
        return None
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def report_run(run: Path) -> Path:
    """Write ``<run>/report/`` and return its folder."""
    if not is_run(run):
        raise FileNotFoundError(f"'{run}' is not a gridgen run folder (no summary.json or metrics/metrics.csv); "
                                "pass run=<outputs/runs/<date>/<time>_...> or a sweep folder")
    out = run / "report"
    out.mkdir(exist_ok=True)
    series = read_metrics(run)
    figures = [
        _save(plot_series(series, list(LOSS_KEYS), "training losses (eq. 3: L = L_base + alpha L_flow)", "loss",
                          logy=True), out / "losses.png"),
        _save(plot_series(series, ["train/alpha"], "alpha schedule", "alpha"), out / "alpha.png"),
        _save(plot_series(series, [k for k in series if k.startswith("lr-")], "learning rate", "learning rate"),
              out / "lr.png"),
        _save(plot_series(series, sorted(k for k in series if k.startswith("val/")), "validation losses", "loss",
                          logy=True), out / "val.png"),
    ]
    samples = sorted((run / "samples").glob("step*/")) if (run / "samples").is_dir() else []
    latest = []
    if samples:  # newest validation sample grids
        for image in sorted(samples[-1].glob("*.png")):
            shutil.copy2(image, out / f"latest_{image.name}")
            latest.append(out / f"latest_{image.name}")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    lines = [f"# Report: {run.name}", ""]
    if summary:
        lines += ["| quantity | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in summary.items() if k != "metrics"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(summary.get("metrics", {}).items())]
        lines.append("")
    lines += [f"![{f.stem}]({f.name})" for f in figures + latest if f is not None]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    log.info("report written to %s", out)
    return out


def _job_row(job: Path) -> dict[str, Any]:
    summary = json.loads((job / "summary.json").read_text())
    config = OmegaConf.load(job / "config.yaml") if (job / "config.yaml").is_file() else OmegaConf.create()
    metrics = summary.get("metrics", {})
    row: dict[str, Any] = {
        "job": job.name,
        "lora.rank": OmegaConf.select(config, "lora.rank"),
        "final_loss_base": metrics.get("train/loss_base"),
        "final_loss_flow": metrics.get("train/loss_flow"),
        "trainable_parameters": summary.get("trainable_parameters"),
        "step_time_s": summary.get("step_time_s"),
        "peak_memory_mb": summary.get("peak_memory_mb"),
    }
    for eval_file in sorted(job.glob("eval/*.json")):  # task metrics when evaluation ran for this job
        for key, value in json.loads(eval_file.read_text()).get("metrics", {}).items():
            if isinstance(value, int | float):
                row[f"eval/{key}"] = value
    return row


def spread_text(values: list[float]) -> str:
    """How far apart a panel's values are, in its own unit and relative to the largest: ``spread 0.0003 (0.02%)``."""
    spread, largest = max(values) - min(values), max(abs(v) for v in values)
    relative = f" ({100 * spread / largest:.2g}% of the largest)" if largest else ""
    return f"spread {spread:.3g}{relative}"


def plot_sweep(rows: list[dict[str, Any]]) -> plt.Figure | None:
    """One panel per quantity over the LoRA rank (log axis, a tick at each swept rank); None without ranks.

    The y axis starts at zero for quantities that cannot be negative, and each panel states the spread of its
    values: a 1.3632 vs 1.3635 difference must not fill the panel's height as if it were large.
    """
    ranked = sorted((r for r in rows if r.get("lora.rank") is not None), key=lambda r: r["lora.rank"])
    panels = [c for c in SWEEP_LABELS if any(r.get(c) is not None for r in ranked)]
    if not ranked or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, column in zip(axes[0], panels, strict=True):
        points = [(r["lora.rank"], r[column]) for r in ranked if r.get(column) is not None]
        ranks, values = zip(*points, strict=True)
        ax.plot(ranks, values, marker="o")
        ax.set(xscale="log", xlabel="LoRA rank", ylabel=SWEEP_LABELS[column], title=column)
        ax.set_xticks(sorted(set(ranks)), [str(r) for r in sorted(set(ranks))])  # exactly the swept ranks
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(plain_number))  # no offset text over the title
        if min(values) >= 0:
            ax.set_ylim(bottom=0, top=max(values) * 1.15 or 1)  # headroom for the spread text
        ax.text(0.03, 0.97, spread_text(list(values)), transform=ax.transAxes, ha="left", va="top", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def report_sweep(sweep: Path) -> Path:
    """Write ``sweep_summary.{csv,md,png}`` in the sweep folder (and each job's report)."""
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").is_file())
    if not jobs:
        raise FileNotFoundError(f"sweep folder '{sweep}' has no finished jobs (no */summary.json)")
    rows = [_job_row(job) for job in jobs]
    for job in jobs:
        report_run(job)
    columns = list(SWEEP_COLUMNS) + sorted({k for r in rows for k in r} - set(SWEEP_COLUMNS))
    with (sweep / "sweep_summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    table = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    table += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (sweep / "sweep_summary.md").write_text(f"# Sweep {sweep.name}\n\n" + "\n".join(table) +
                                            "\n\n![sweep](sweep_summary.png)\n")
    _save(plot_sweep(rows), sweep / "sweep_summary.png")
    log.info("sweep summary written to %s", sweep / "sweep_summary.md")
    return sweep / "sweep_summary.md"


def report(path: str | Path | None) -> Path:
    """The report of a run folder (``<run>/report/``) or a sweep folder (``sweep_summary.md``); returns it."""
    if path in (None, "", "???"):
        raise ValueError(f"run= is not set; {RUN_HINT}")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"report: '{path}' is not a folder; {RUN_HINT}")
    if is_sweep(path):
        return report_sweep(path)
    return report_run(path)


class SweepReport(Callback):
    """Hydra callback: writes the sweep summary when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        try:
            report_sweep(sweep)
        except FileNotFoundError as err:  # e.g. every job failed: say so, do not mask the jobs' own errors
            log.warning("no sweep summary: %s", err)
