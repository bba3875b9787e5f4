"""Captions ``c' = [c_layout, c_content]`` (paper section 2.2) and the captioners that write ``c_content``.

``c_layout`` comes from the layout and a template in the config: "A 16-frame sequence arranged in a 4x4
grid." (video) or Table 4's "A 24-frame sequence arranged in a 4x6 grid." (multi-view). ``c_content`` is a
captioner's text put into a content template: video uses the caption as it is; multi-view uses Table 4's
"Each frame captures a 3D model of {caption} from a different angle, rotating 360 degrees. ...".

Captioners: :class:`MetadataCaptioner` (default) takes the caption the source found (CSV column, sidecar
file, default caption); :class:`VLMCaptioner` asks a vision-language model from ``transformers`` (the paper
used GLM-4V-9B for the coarse stage), and only runs with weights that are already on this machine.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gridgen.data.sources.base import Clip, RawItem, SkipInput
from gridgen.layout import GridLayout

log = logging.getLogger(__name__)

VIDEO_LAYOUT_TEMPLATE = "A {frames}-frame sequence arranged in a {rows}x{cols} grid."
MULTIVIEW_CONTENT_TEMPLATE = (  # paper Table 4, "Common Format"
    "Each frame captures a 3D model of {caption} from a different angle, rotating 360 degrees. "
    "The sequence begins with a front view and progresses through a complete clockwise rotation."
)


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class CaptionTemplates:
    layout: str = VIDEO_LAYOUT_TEMPLATE  # {frames}, {rows}, {cols}
    content: str = "{caption}"  # {caption}: the captioner's text

    def __post_init__(self) -> None:
        try:
            self.layout.format(frames=16, rows=4, cols=4)
        except (KeyError, IndexError) as exn:
            raise ValueError(f"data.captions.layout_template may use {{frames}}, {{rows}}, {{cols}}; got "
                             f"{self.layout!r}") from exn
        if "{caption}" not in self.content:
            raise ValueError(f"data.captions.content_template must contain {{caption}}, got {self.content!r}")

    def compose(self, layout: GridLayout, caption: str) -> tuple[str, str, str]:
        """``(c_layout, c_content, full caption)``."""
        caption = clean(caption)
        if not self.content.rstrip().endswith("{caption}"):
            caption = caption.rstrip(".")  # the caption is a subject inside a sentence
        c_content = clean(self.content.replace("{caption}", caption))
        c_layout = layout.caption_prefix(template=self.layout)
        return c_layout, c_content, f"{c_layout} {c_content}".strip()


class Captioner(Protocol):
    """Writes the raw ``c_content`` text of one grid; raises :class:`SkipInput` when it cannot."""

    needs_pixels: bool

    def __call__(self, item: RawItem, clip: Clip | None, grid: np.ndarray | None) -> str: ...


class MetadataCaptioner:
    """The caption that came with the input (CSV column, sidecar file or the source's default caption)."""

    needs_pixels = False

    def __call__(self, item: RawItem, clip: Clip | None = None, grid: np.ndarray | None = None) -> str:
        if not item.caption or not item.caption.strip():
            raise SkipInput("missing_caption", item.id)
        return item.caption


class VLMCaptioner:
    """A local ``transformers`` vision-language model describing the grid image.

    ``model`` is a folder or a hub id already in the local Hugging Face cache; nothing is downloaded.
    The model is loaded on first use (in each prepare worker).
    """

    needs_pixels = True

    def __init__(self, model: str, prompt: str, max_new_tokens: int = 77, device: str = "cpu",
                 dtype: str = "float32") -> None:
        self.model_path = resolve_local_model(model)
        self.prompt = prompt
        self.max_new_tokens = int(max_new_tokens)
        self.device = device
        self.dtype = dtype
        self._model: Any = None
        self._processor: Any = None

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self._processor = AutoProcessor.from_pretrained(self.model_path, local_files_only=True)
        self._model = AutoModelForImageTextToText.from_pretrained(
            self.model_path, local_files_only=True, dtype=getattr(torch, self.dtype)).to(self.device).eval()

    def __call__(self, item: RawItem, clip: Clip | None, grid: np.ndarray | None) -> str:
        import torch
        from PIL import Image

        if grid is None:
            raise ValueError("VLMCaptioner needs the grid image")
        if self._model is None:
            self._load()
        messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(grid)},
                                                 {"type": "text", "text": self.prompt}]}]
        inputs = self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        text = self._processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        if not text.strip():
            raise SkipInput("missing_caption", f"{item.id}: the VLM returned an empty caption")
        return text


def resolve_local_model(model: str) -> str:
    """A local folder for ``model`` (a folder, or a hub id in the local cache), else a one-line error."""
    path = Path(str(model)).expanduser()
    if path.is_dir():
        return str(path)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(str(model), local_files_only=True)
    except Exception as exn:  # not cached (LocalEntryNotFoundError), or not a valid id (HFValidationError)
        raise FileNotFoundError(
            f"captioner weights '{model}' are not on this machine (not a folder, not in the local Hugging Face "
            f"cache); download them first (`hf download {model}`) or use data.captions.captioner=metadata"
        ) from exn


def build_captioner(captioner: str = "metadata", vlm: dict[str, Any] | None = None) -> Captioner:
    if captioner == "metadata":
        return MetadataCaptioner()
    if captioner == "vlm":
        vlm = dict(vlm or {})
        if not vlm.get("model"):
            raise ValueError("data.captions.captioner=vlm needs data.captions.vlm.model=<local folder or hub id>")
        return VLMCaptioner(**vlm)
    raise ValueError(f"data.captions.captioner must be 'metadata' or 'vlm', got {captioner!r}")
