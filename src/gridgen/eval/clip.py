"""CLIP metrics from a local CLIP model folder (transformers ``CLIPModel`` + its processor and tokenizer).

All scores are cosine similarities of L2-normalised CLIP embeddings, in [-1, 1], not multiplied by 100:

* ``clip_img`` (i2v, paper Table 2): mean over the generated frames of cos(E(reference image), E(frame)),
  then over videos. The reference is the conditioning image (a sample's ``reference.png`` / manifest
  ``reference``), else the first frame of the real video of the same name.
* ``clip_text``: mean over frames of cos(E_text(caption), E(frame)), then over videos (CLIPSIM).
* ``temporal_consistency``: mean cos(E(frame_t), E(frame_t+1)) (see :mod:`gridgen.eval.metrics`).
* ``clip_f`` / ``clip_o`` (multi-view, paper Table 1, "following Liang et al. 2024", Diffusion4D):
  - CLIP-F (front): cos(E(reference front view), E(generated front view ``front_view``));
  - CLIP-O (orbit): mean over all generated views v of cos(E(reference front view), E(view v)).
  The reference front view is the condition image for i2mv, and the real sequence's front view for t2mv.

Why these definitions: Diffusion4D reports CLIP-F / CLIP-O as image-level CLIP similarities of the front view
and of the orbital views against the reference, and the paper's values (CLIP-F 0.94, CLIP-O 0.62) are in the
range of image-image cosine similarities (a text-image cosine is about 0.3); a front view that matches its
reference scores close to 1 while views from other sides of the object score lower, which is what the
CLIP-F > CLIP-O gap in Table 1 shows. These definitions are ours, written down so that numbers are reproducible;
they are not the paper's code.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class ClipModelNotFoundError(FileNotFoundError):
    """No local CLIP folder: CLIP metrics are skipped or fail with this one-line message."""


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers logs backend notices (no torchvision: PIL processor) at warning level on every load."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _features(output: torch.Tensor | object) -> torch.Tensor:
    """transformers 4 returns the projected features, transformers 5 a ModelOutput holding them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder:
    """L2-normalised CLIP image and text embeddings (float64 on CPU) from a local model folder."""

    def __init__(self, path: str | Path | None, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        if not path:
            raise ClipModelNotFoundError(
                "CLIP metrics need a local CLIP model folder: set eval.clip.model=<folder saved with "
                "save_pretrained, e.g. openai/clip-vit-large-patch14 from `hf download`>")
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise ClipModelNotFoundError(f"eval.clip.model '{path}' is not a transformers CLIP folder (no config.json)")
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        with _transformers_quiet():
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if _has_tokenizer(path) else None
        self.device, self.batch_size, self.path = torch.device(device), batch_size, str(path)

    @torch.inference_mode()
    def images(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, 3, H, W)`` -> ``(N, D)`` unit vectors."""
        out = []
        for start in range(0, len(frames), self.batch_size):
            chunk = [f.permute(1, 2, 0).numpy() for f in frames[start:start + self.batch_size]]  # HWC uint8
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(_features(self.model.get_image_features(pixel_values=pixels)).double().cpu())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.inference_mode()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """Captions -> ``(N, D)`` unit vectors (truncated to CLIP's context length)."""
        if self.tokenizer is None:
            raise ClipModelNotFoundError(f"CLIP folder '{self.path}' has no tokenizer; clip_text needs one")
        out = []
        max_len = self.model.config.text_config.max_position_embeddings
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                    max_length=max_len, return_tensors="pt").to(self.device)
            out.append(_features(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                              attention_mask=tokens["attention_mask"])).double().cpu())
        return F.normalize(torch.cat(out), dim=-1)


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))


# ---------------------------------------------------------------------------------------------- scores
def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last axis (broadcasting)."""
    return (F.normalize(a.double(), dim=-1) * F.normalize(b.double(), dim=-1)).sum(-1)


def clip_image_score(reference: torch.Tensor, frames: torch.Tensor) -> float:
    """CLIP_img of one video: mean over frames ``(T, D)`` of cos(reference ``(D,)``, frame)."""
    return float(cosine(reference.unsqueeze(0), frames).mean())


def clip_text_score(text: torch.Tensor, frames: torch.Tensor) -> float:
    """Text-frame CLIP score of one video: mean over frames of cos(text, frame)."""
    return float(cosine(text.unsqueeze(0), frames).mean())


def clip_front(reference: torch.Tensor, views: torch.Tensor, front_view: int = 0) -> float:
    """CLIP-F of one sequence: cos(reference front view, generated view ``front_view``)."""
    if not 0 <= front_view < len(views):
        raise ValueError(f"eval.clip.front_view={front_view} is outside the {len(views)} views")
    return float(cosine(reference, views[front_view]))


def clip_orbit(reference: torch.Tensor, views: torch.Tensor) -> float:
    """CLIP-O of one sequence: mean over all generated views ``(V, D)`` of cos(reference front view, view)."""
    return float(cosine(reference.unsqueeze(0), views).mean())


def mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
