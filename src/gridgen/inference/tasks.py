"""Task recipes: what each omni-inference task puts in the grid before sampling, which cells it keeps, its caption.

Every task is the same sampler (``sampler.py``) with a different start (paper 2.4, A.5):

    init        the clean grid that eq. (9) noises to T             kept cells (M = 0, eq. 10)
    ----------  ---------------------------------------------------  --------------------------------
    noise       none (T = 1: pure noise)                             none
    expand      every cell = I_ref (eq. 8, expansion)                cell (0,0)
    interpolate I_ij = (1 - j/n) I_i0 + (j/n) I_(i+1)0 (eq. 8)        the keyframes, cells (i,0)
    sequence    the input sequence, tiled (A.5, eq. 13)               none

Tasks are rows of the task table (``conf/task/*.yaml``) naming an init, the reference they need and the mask;
this module turns images into those grids. Frames are ``(F, 3, h, w)`` float tensors in [-1, 1].
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gridgen.files import natural_key
from gridgen.layout import PIXELS_PER_TOKEN, GridLayout
from gridgen.video import read_video

log = logging.getLogger(__name__)

INITS = ("noise", "expand", "interpolate", "sequence")
REFERENCES = ("none", "image", "keyframes", "sequence")
KEEPS = ("none", "reference")
KINDS = ("video", "multiview")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".avi", ".mkv", ".gif")
ASPECT_TOLERANCE = 0.01  # aspects within 1% are resized without a crop or a warning


@dataclass(frozen=True)
class TaskSpec:
    """What generation reads of a task row, ``conf/task/<name>.yaml``."""

    name: str
    kind: str = "video"
    layout: str = "4x4"
    T: float = 1.0
    init: str = "noise"
    reference: str = "none"
    keep: str = "none"
    caption_layout: str | None = None
    caption_content: str = "{prompt}"

    def __post_init__(self) -> None:
        for field, allowed in (("kind", KINDS), ("init", INITS), ("reference", REFERENCES), ("keep", KEEPS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"task {self.name}: {field} must be one of {list(allowed)}, got {getattr(self, field)!r}")
        needs = {"noise": "none", "expand": "image", "interpolate": "keyframes", "sequence": "sequence"}[self.init]
        if self.reference != needs:
            raise ValueError(f"task {self.name}: init={self.init} needs reference={needs}, got {self.reference}")

    @classmethod
    def from_config(cls, cfg: Any) -> TaskSpec:
        """The generation fields of a task row (the row also holds evaluation and training fields)."""
        data = {key: cfg[key] for key in cls.__dataclass_fields__ if key in cfg}
        if data.get("init") is None:
            from gridgen.config import tasks_with

            raise ValueError(f"task {data.get('name')} does not generate (its row in conf/task has init: null); "
                             f"generate with task={'|'.join(tasks_with('init', data.get('kind')))}")
        return cls(**data)

    def caption(self, layout: GridLayout, prompt: str) -> str:
        """``c' = [c_layout, c_content]`` (paper 2.2) with this task's templates."""
        content = self.caption_content.format(prompt=prompt.strip())
        return layout.caption(content, self.kind, template=self.caption_layout)


# ---- prompts -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleRequest:
    """One grid to generate."""

    index: int
    prompt: str
    seed: int
    ref: Any = None  # str, list of str, or None


def read_requests(prompt: str | None, prompts_file: str | None, ref: Any, seed: int) -> list[SampleRequest]:
    """``prompt=`` or ``prompts_file=`` -> requests; sample k gets ``seed + k`` unless its JSON line sets one.

    A prompts file has one sample per line: plain text, or a JSON object ``{"prompt", "ref", "seed"}`` whose
    relative ``ref`` paths are looked up next to the prompts file first, then in the working directory. Blank
    lines and ``#`` lines are skipped.
    """
    if prompt is not None and prompts_file is not None:
        raise ValueError("set either prompt= or prompts_file=, not both")
    entries: list[dict[str, Any]] = []
    if prompts_file is not None:
        path = Path(str(prompts_file)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file '{prompts_file}' does not exist")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from e
                if not isinstance(entry.get("prompt"), str):
                    raise ValueError(f"{path}:{number}: a JSON line needs a \"prompt\" string")
                if entry.get("ref") is not None:
                    refs = entry["ref"] if isinstance(entry["ref"], list) else [entry["ref"]]
                    refs = [_beside(path, r) for r in refs]
                    entry["ref"] = refs if isinstance(entry["ref"], list) else refs[0]
                entries.append(entry)
            else:
                entries.append({"prompt": line})
        if not entries:
            raise ValueError(f"prompts_file '{prompts_file}' has no prompts (one per line)")
    elif prompt is not None and str(prompt).strip():
        entries.append({"prompt": str(prompt)})
    else:
        raise ValueError('no prompt: set prompt="..." or prompts_file=<file with one prompt per line>')
    return [SampleRequest(index=k, prompt=e["prompt"], seed=int(e.get("seed", int(seed) + k)), ref=e.get("ref", ref))
            for k, e in enumerate(entries)]


def _beside(prompts_file: Path, ref: str) -> str:
    candidate = prompts_file.parent / Path(str(ref)).expanduser()  # an absolute ref stays as it is
    return str(candidate) if candidate.exists() else str(ref)


# ---- layout --------------------------------------------------------------------------------------------
def resolve_layout(spec: str, height: int, width: int | None = None) -> GridLayout:
    """``"4x6"`` and a grid height (width: square cells by default) -> layout; errors say which size fits."""
    probe = GridLayout.parse(spec, PIXELS_PER_TOKEN)  # rows, cols (and the '<rows>x<cols>' error)
    rows, cols = probe.rows, probe.cols
    sizes = {"height": (int(height), rows)}
    if width is not None:
        sizes["width"] = (int(width), cols)
    for name, (size, cells) in sizes.items():
        unit = cells * PIXELS_PER_TOKEN  # every cell a multiple of 16 px (VAE 8 x 2x2 packing)
        if size < unit or size % unit:
            raise ValueError(
                f"layout {rows}x{cols} needs a grid {name} divisible by {unit} px ({cells} cells, each a multiple "
                f"of {PIXELS_PER_TOKEN} px), got {size}; set generate.{name}={max(unit, round(size / unit) * unit)}"
            )
    if width is None:
        width = cols * (int(height) // rows)  # square cells
    return GridLayout.from_image_size(rows, cols, int(height), int(width))


# ---- images --------------------------------------------------------------------------------------------
def load_images(ref: Any) -> tuple[list[Image.Image], str]:
    """``ref`` (an image, a folder of images in natural name order, a video file, or a list of images) ->
    ``(images, what)`` with ``what`` saying where they came from (for messages)."""
    if ref is None or (isinstance(ref, str) and not ref.strip()):
        raise ValueError("this task needs a reference: set ref=<image, folder of images or video>")
    if not isinstance(ref, str | Path):
        paths = [Path(str(p)).expanduser() for p in ref]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"reference image '{p}' does not exist")
        return [_open_image(p) for p in paths], f"ref list of {len(paths)} images"
    path = Path(str(ref)).expanduser()
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
        if not files:
            raise FileNotFoundError(f"reference folder '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return [_open_image(p) for p in files], f"folder '{path}' ({len(files)} images)"
    if not path.is_file():
        raise FileNotFoundError(f"reference '{path}' does not exist")
    if path.suffix.lower() in VIDEO_SUFFIXES:
        frames = [Image.fromarray(frame) for frame in read_video(path)]  # ValueError if it holds none
        return frames, f"video '{path}' ({len(frames)} frames)"
    return [_open_image(path)], f"image '{path}'"


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise ValueError(f"reference '{path}' is not a readable image ({e})") from e


def fit_image(image: Image.Image, height: int, width: int, name: str, min_kept: float = 0.5) -> Image.Image:
    """Resize to ``width x height``; another aspect is center-cropped first, with a warning, if the crop keeps
    at least ``min_kept`` of the image, and is an error otherwise."""
    src_aspect, dst_aspect = image.width / image.height, width / height
    if abs(src_aspect / dst_aspect - 1) > ASPECT_TOLERANCE:
        kept = min(src_aspect, dst_aspect) / max(src_aspect, dst_aspect)
        if kept < min_kept:
            raise ValueError(
                f"{name} is {image.width}x{image.height} px (aspect {src_aspect:.2f}) but the target is "
                f"{width}x{height} px (aspect {dst_aspect:.2f}): a center crop would keep only {kept:.0%} of it "
                f"(ref_fit.min_kept={min_kept}); crop it yourself, set generate.height/generate.width to its "
                f"aspect, or lower ref_fit.min_kept"
            )
        log.warning("%s is %dx%d px, not the aspect of %dx%d px: center-cropped to %.0f%% of it and resized",
                    name, image.width, image.height, width, height, 100 * kept)
        if src_aspect > dst_aspect:  # too wide
            crop_w = round(image.height * dst_aspect)
            left = (image.width - crop_w) // 2
            image = image.crop((left, 0, left + crop_w, image.height))
        else:
            crop_h = round(image.width / dst_aspect)
            top = (image.height - crop_h) // 2
            image = image.crop((0, top, image.width, top + crop_h))
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return image


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> ``(F, 3, h, w)`` float32 in [-1, 1]."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (F, h, w, 3) in [0, 255]
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


# ---- references -> frames of the initial grid --------------------------------------------------------
def reference_frames(spec: TaskSpec, layout: GridLayout, ref: Any, min_kept: float = 0.5) -> torch.Tensor:
    """The task's reference as ``(K, 3, cell_h, cell_w)``: 1 image, rows or rows + 1 keyframes, or all frames."""
    h, w = layout.cell_height, layout.cell_width
    if spec.reference == "none":
        if ref not in (None, ""):
            log.warning("task %s ignores ref=%s", spec.name, ref)
        return torch.empty(0, 3, h, w)
    images, what = load_images(ref)
    if spec.reference == "image":
        if len(images) != 1:
            raise ValueError(f"task {spec.name} takes one reference image, got {what}")
        return to_tensor([fit_image(images[0], h, w, f"reference {what}", min_kept)])
    if spec.reference == "keyframes":
        if len(images) < layout.rows:
            raise ValueError(
                f"too few keyframes for layout {layout.name}: task {spec.name} puts one keyframe in the first "
                f"cell of each of the {layout.rows} rows (plus an optional end keyframe), got {what}"
            )
        if len(images) > layout.rows + 1:
            raise ValueError(f"too many keyframes for layout {layout.name}: {layout.rows} (one per row) or "
                             f"{layout.rows + 1} (with the end keyframe) expected, got {what}")
        return to_tensor([fit_image(im, h, w, f"keyframe {k} of {what}", min_kept) for k, im in enumerate(images)])
    # sequence: a grid image of this layout, or frames (subsampled evenly when there are more)
    if len(images) == 1:
        grid = to_tensor([fit_image(images[0], layout.height, layout.width, f"grid {what}", min_kept)])[0]
        return layout.untile(grid)  # (F, 3, h, w)
    if len(images) < layout.num_cells:
        raise ValueError(f"task {spec.name} with layout {layout.name} needs {layout.num_cells} frames (or one "
                         f"grid image), got {what}")
    if len(images) > layout.num_cells:
        picks = np.linspace(0, len(images) - 1, layout.num_cells).round().astype(int)
        log.info("%s: using %d of %d frames, evenly spaced", what, layout.num_cells, len(images))
        images = [images[k] for k in picks]
    return to_tensor([fit_image(im, h, w, f"frame {k} of {what}", min_kept) for k, im in enumerate(images)])


def initial_frames(spec: TaskSpec, layout: GridLayout, ref: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(frames (F, 3, h, w) | None, keep (F,) bool)``: the clean grid that eq. (9) noises, and the kept cells."""
    F = layout.num_cells
    keep = torch.zeros(F, dtype=torch.bool)
    if spec.init == "noise":
        return None, keep
    if spec.init == "expand":  # eq. (8), expansion: I_ij = I_ref
        frames = ref[:1].expand(F, *ref.shape[1:]).clone()
        keep[0] = True
    elif spec.init == "interpolate":  # eq. (8): I_ij = (1 - j/n) I_i0 + (j/n) I_(i+1)0
        rows, n = layout.rows, layout.cols
        start = ref[:rows]  # (rows, 3, h, w): I_i0
        end = torch.cat([ref[1:rows], ref[rows:rows + 1] if len(ref) > rows else ref[rows - 1:rows]])  # I_(i+1)0
        weight = (torch.arange(n, dtype=ref.dtype) / n).view(1, n, 1, 1, 1)  # j / n
        frames = ((1 - weight) * start[:, None] + weight * end[:, None]).reshape(F, *ref.shape[1:])  # (rows*n, ...)
        keep.view(rows, n)[:, 0] = True
    else:  # sequence (A.5): the whole input, no mask
        frames = ref
    if spec.keep == "none":
        keep[:] = False
    return frames, keep


def keep_tokens(layout: GridLayout, keep_cells: torch.Tensor) -> torch.Tensor:
    """Cell mask ``(F,)`` -> token mask ``(1, N, 1)`` bool in packed-token order."""
    cells = keep_cells.view(1, layout.num_cells, 1, 1).expand(1, layout.num_cells, layout.cell_tokens, 1)
    return layout.cells_to_tokens(cells.float()).bool()  # (1, N, 1)
