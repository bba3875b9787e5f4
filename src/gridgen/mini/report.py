"""The miniature's report: one table (mean and 95 % interval over seeds, per variant) and one figure, written once to
``<out>/report.md`` and ``<out>/report.png``.

The interval is Student's t: ``mean +- t_{0.975, n-1} * sd / sqrt(n)`` over the n seeds (n = 3: +- 2.48 sd).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from gridgen.mini.steps import plain  # noqa: E402

# (key in a run's figures, column title, format, which way is better); keys are dotted paths into done.json
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("metrics.world_identity_all", "identity consistent (% grids)", "{:.0f}", "higher"),
    ("metrics.world_identity_cells", "cells with the prompted shape and colour (%)", "{:.1f}", "higher"),
    ("metrics.world_motion_all", "motion correct (% grids)", "{:.0f}", "higher"),
    ("metrics.world_smoothness_px", "smoothness residual (px)", "{:.2f}", "lower"),
    ("metrics.world_row_break", "row-break jump / within-row step", "{:.2f}", "closer to 1"),
    ("metrics.fvd", "FVD (I3D)", "{:.0f}", "lower"),
    ("held_out.val/loss_base", "held-out L_base", "{:.4f}", "lower"),
    ("held_out.val/loss_flow", "held-out L_flow", "{:.4f}", "lower"),
)
PERCENT = {"metrics.world_identity_all", "metrics.world_identity_cells", "metrics.world_motion_all"}


def dig(record: dict[str, Any], key: str) -> float | None:
    """``dig(r, "metrics.fvd")``: a dotted key (the first dot splits; metric names may hold dots or slashes)."""
    head, _, rest = key.partition(".")
    value = record.get(head, {}).get(rest) if rest else record.get(head)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def interval(values: list[float]) -> tuple[float, float]:
    """``(mean, half width of the 95 % t interval)``; half width nan for one value."""
    array = np.asarray(values, dtype=np.float64)
    if len(array) < 2:
        return float(array.mean()), math.nan
    return float(array.mean()), float(stats.t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array)))


def summarise(records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{variant: {key: (mean, half width, seeds)}}`` over the seeds that have the figure."""
    table: dict[str, dict[str, tuple[float, float, int]]] = {}
    for variant, runs in records.items():
        row = {}
        for key, _, _, _ in COLUMNS:
            values = [v for v in (dig(r, key) for r in runs) if v is not None]
            if values:
                scale = 100.0 if key in PERCENT else 1.0
                mean, half = interval([v * scale for v in values])
                row[key] = (mean, half, len(values))
        table[variant] = row
    return table


def paired(records: dict[str, list[dict[str, Any]]], base: str = "base_without_lora",
           ) -> dict[tuple[str, str], dict[str, tuple[float, float, list[float]]]]:
    """Differences between the LoRA variants paired by seed (a seed is the same initial LoRA and data order in every
    variant): ``{(later, earlier): {key: (mean, half width of the 95 % t interval, per-seed differences)}}`` for
    every two variants in the order given (the first variant is each later one's reference; the base, which has no
    LoRA, is left out), over the seeds both have, in seed order."""
    variants = [v for v in records if v != base]
    by_seed = {v: {int(r["seed"]): r for r in records[v]} for v in variants}
    out: dict[tuple[str, str], dict[str, tuple[float, float, list[float]]]] = {}
    for i, earlier in enumerate(variants):
        for later in variants[i + 1:]:
            seeds = sorted(set(by_seed[earlier]) & set(by_seed[later]))
            row = {}
            for key, _, _, _ in COLUMNS:
                scale = 100.0 if key in PERCENT else 1.0
                pairs = [(dig(by_seed[later][s], key), dig(by_seed[earlier][s], key)) for s in seeds]
                diffs = [scale * (a - b) for a, b in pairs if a is not None and b is not None]
                if diffs:
                    row[key] = (*interval(diffs), diffs)
            out[(later, earlier)] = row
    return out


def paired_markdown(differences: dict[tuple[str, str], dict[str, tuple[float, float, list[float]]]]) -> str:
    """One row per metric, one column per pair: ``mean ± half (per seed)``, bold where the interval excludes 0."""
    pairs = [pair for pair, row in differences.items() if row]
    if not pairs:
        return ""
    lines = ["| paired difference | " + " | ".join(f"{a} - {b}" for a, b in pairs) + " |",
             "|" + " --- |" * (len(pairs) + 1)]
    for key, title, fmt, better in COLUMNS:
        if not any(key in differences[pair] for pair in pairs):
            continue
        signed = "{:+" + fmt[2:]  # "{:.2f}" -> "{:+.2f}"
        cells = []
        for pair in pairs:
            if key not in differences[pair]:
                cells.append("-")
                continue
            mean, half, diffs = differences[pair][key]
            text = signed.format(mean) + ("" if math.isnan(half) else " ± " + fmt.format(half))
            text = f"**{text}**" if not math.isnan(half) and abs(mean) > half else text
            cells.append(f"{text} ({', '.join(signed.format(d) for d in diffs)})")
        lines.append(f"| {title} ({better}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(table: dict[str, dict[str, tuple[float, float, int]]]) -> str:
    head = "| variant | " + " | ".join(f"{title} ({better})" for _, title, _, better in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    seeds = max((n for row in table.values() for _, _, n in row.values()), default=0)
    for variant, row in table.items():
        cells = []
        for key, _, fmt, _ in COLUMNS:
            if key not in row:
                cells.append("-")
                continue
            mean, half, n = row[key]
            cell = fmt.format(mean)
            if not math.isnan(half):
                cell += " ± " + fmt.format(half)
            cells.append(cell + (f" (n={n} of {seeds} seeds)" if n < seeds else ""))  # undefined for the others
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(table: dict[str, dict[str, tuple[float, float, int]]], path: Path) -> Path:
    """One bar chart per column: each variant's mean with its 95 % interval."""
    keys = [c for c in COLUMNS if any(c[0] in row for row in table.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4), squeeze=False)
    variants = list(table)
    colors = plt.cm.tab10(np.arange(len(variants)))
    for ax, (key, title, _, better) in zip(axes[0], keys, strict=True):
        means = [table[v].get(key, (math.nan, math.nan, 0))[0] for v in variants]
        halves = [table[v].get(key, (math.nan, math.nan, 0))[1] for v in variants]
        ax.bar(range(len(variants)), means, yerr=np.nan_to_num(halves), color=colors, capsize=4)
        ax.set_xticks(range(len(variants)), variants, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{title}\n({better})", fontsize=9)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


TARGETS = (  # (key, lower bound, text): the targets for the paper's settings (filmstrip), checked and printed, never tuned
    ("metrics.world_identity_all", 80.0, "identity consistency >= 80 % of grids"),
    ("metrics.world_motion_all", 80.0, "motion correct >= 80 % of grids"),
)


def grids_picture(out: Path, variants: list[str], path: Path, count: int = 4) -> Path | None:
    """The first ``count`` generated grids of seed 0 of each variant, one row per variant, labelled."""
    from PIL import Image, ImageDraw

    rows = []
    for variant in variants:
        files = sorted((out / variant / "seed0" / "grids").glob("*.png"))[:count]
        if files:
            rows.append((variant, [Image.open(f).convert("RGB") for f in files]))
    if not rows:
        return None
    size = rows[0][1][0].size
    label_w, gap = 130, 6
    canvas = Image.new("RGB", (label_w + count * (size[0] + gap), len(rows) * (size[1] + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (variant, images) in enumerate(rows):
        y = r * (size[1] + gap)
        draw.text((4, y + size[1] // 2 - 6), variant, fill=(0, 0, 0))
        for c, image in enumerate(images):
            canvas.paste(image, (label_w + c * (size[0] + gap), y))
    canvas.save(path)
    return path


def guider_words(eval_cfg: Any) -> str:
    """`` through diffusers' <guider> (<its arguments>)`` for an ``eval.guider``, nothing for true CFG on every step."""
    guider = dict(plain(eval_cfg).get("guider") or {})
    if not guider:
        return ""
    name = guider.pop("name")
    return f" through diffusers' {name}" + (f" ({', '.join(f'{k}={v}' for k, v in guider.items())})" if guider else "")


def kept_vae(vae: dict[str, Any]) -> str:
    """The VAE's kept identity (:func:`gridgen.eval.shapes.kept_identity`) as text; builds before it: not measured."""
    from gridgen.eval.shapes import describe_kept

    kept = vae.get("kept_identity")
    if not kept:
        return "its reconstructions were not read by the detector (a build made before that check)"
    return f"the detector reads {describe_kept(kept)} of its reconstructions as the same shape and colour"


def write_report(out: Path, cfg: Any, build: Path, figures: dict[str, Any], records: dict[str, list[dict[str, Any]]],
                 machine: dict[str, Any], seconds: float, earlier: int = 0) -> Path:
    """``<out>/report.md`` (written last, atomically) with ``report.png`` and ``grids.png`` beside it. ``seconds``:
    this command's wall time; ``earlier``: how many cells an earlier, stopped `make mini` of ``out`` finished or
    began (their time then is not in ``seconds``)."""
    from gridgen.files import write_text_atomic

    table = summarise(records)
    figure(table, out / "report.png")
    picture = grids_picture(out, list(records), out / "grids.png")
    prompts = sorted((out / next(iter(records)) / "seed0" / "grids").glob("*.json")) if records else []
    lines = [
        "# The miniature GRID: L_flow ablation", "",
        f"Command: `make mini` ({' '.join(sys.argv[1:]) or 'defaults'}); wall time {seconds / 60:.1f} min "
        f"(build steps cached before this run took 0 s"
        + (f"; {earlier} of the {sum(map(len, records.values()))} runs were made or begun by an earlier, stopped "
           "`make mini` of this folder: their time then is not in it" if earlier else "") + ").",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), {machine['gpu']}.",
        f"Build: `{build}`; variants x seeds: {', '.join(records)} x {list(cfg.runs.seeds)}; "
        f"{len(prompts)} held-out grids per run (one per test clip, the held-out combinations), each sampled with "
        f"{int(cfg.eval.steps)} Euler steps and true CFG {float(cfg.eval.true_cfg_scale):g}"
        f"{guider_words(cfg.eval)} (`eval.*`).", "",
        "## Build", "",
        f"- VAE: held-out PSNR **{figures['vae']['psnr_db']:.2f} dB** (target >= 28) on "
        f"{figures['vae']['held_out_cells']} frames of unseen combinations; {figures['vae']['seconds']:.0f} s; "
        f"{kept_vae(figures['vae'])}.",
        f"- Base model: shape and colour right in **{100 * figures['base_eval']['right_fraction']:.1f} %** of "
        f"{figures['base_eval']['frames']} frames drawn for held-out prompts (target >= 90 %); trained in "
        f"{figures['base_run']['seconds']:.0f} s.",
        "- Build steps (s): " + ", ".join(f"{k} {v.get('seconds', 0):.0f}" for k, v in figures.items()), "",
        "## Results (mean ± 95 % interval over seeds)", "",
        markdown_table(table), "",
        "![metrics](report.png)", "",
    ]
    differences = paired(records)
    if paired_table := paired_markdown(differences):
        count = sum(len(row) for row in differences.values())
        seeds = sorted({int(r["seed"]) for runs in records.values() for r in runs})
        lines += ["## Paired by seed (exploratory)", "",
                  "A seed is the same initial LoRA and the same data order in every variant, so the variants' "
                  "difference within a seed is free of what the seed alone moves. Mean ± 95 % t interval of the "
                  f"per-seed differences (seeds {seeds} in brackets), bold where the interval excludes 0: of these "
                  f"{count} intervals about {count / 20:.1f} would exclude 0 by chance alone.", "", paired_table, ""]
    if picture is not None:
        lines += ["First generated grids of seed 0 (prompts in `<variant>/seed0/grids/NNNN.json`):", "",
                  "![grids](grids.png)", ""]
    from gridgen.eval.shapes import validate_detector

    lines += ["## The detector behind the world metrics", "", validate_detector().markdown(), ""]
    lines += ["## Targets (the paper's settings: filmstrip)", ""]
    paper = table.get("filmstrip", {})
    for key, bound, text in TARGETS:
        if key in paper:
            mean = paper[key][0]
            lines.append(f"- {text}: {mean:.1f} -> {'met' if mean >= bound else 'NOT met'}")
    base_fvd, film_fvd = table.get("base_without_lora", {}).get("metrics.fvd"), paper.get("metrics.fvd")
    if base_fvd and film_fvd:
        ratio = base_fvd[0] / film_fvd[0]
        lines.append(f"- FVD at least 3x lower than the base prompted for grids: {base_fvd[0]:.0f} / {film_fvd[0]:.0f}"
                     f" = {ratio:.1f}x -> {'met' if ratio >= 3 else 'NOT met'}")
    lines += ["", "## Per run", "", "| variant | seed | train s | eval s |", "| --- | --- | --- | --- |"]
    for variant, runs in records.items():
        for record in runs:
            resumed = record.get("resumed_from_step")
            since = f" (steps after {resumed} only)" if resumed is not None else ""
            lines.append(f"| {variant} | {record['seed']} | {record.get('train_s', 0):.0f}{since} | "
                         f"{record['eval_s']:.0f} |")
    return write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
