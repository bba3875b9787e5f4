"""CLIP metrics on a tiny random CLIP built from transformers configs, saved and loaded back (no hub)."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gridgen.eval.clip import (
    ClipEmbedder,
    ClipModelNotFoundError,
    clip_front,
    clip_image_score,
    clip_orbit,
    clip_text_score,
)
from tests.helpers.evaluate import make_tiny_clip


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> ClipEmbedder:
    return ClipEmbedder(make_tiny_clip(tmp_path_factory.mktemp("clip")), batch_size=3)


def frames(seed: int, n: int = 5, size: int = 40) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_image_and_text_embeddings_match_the_model(embedder):
    x = frames(0)
    ours = embedder.images(x)  # batched by 3
    assert ours.shape == (5, 16) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.norm(dim=-1).numpy(), 1.0, rtol=1e-12)
    pixels = embedder.processor(images=[f.permute(1, 2, 0).numpy() for f in x], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = embedder.model.get_image_features(pixel_values=pixels)
    direct = F.normalize((out if isinstance(out, torch.Tensor) else out.pooler_output).double(), dim=-1)
    torch.testing.assert_close(ours, direct, rtol=1e-5, atol=1e-6)
    texts = embedder.texts(["a red circle moves from left to right", "a blue square"])
    assert texts.shape == (2, 16) and not torch.allclose(texts[0], texts[1])


def test_scores_match_plain_cosines(embedder):
    video, ref = embedder.images(frames(1)), embedder.images(frames(2, n=1))[0]
    loop = np.mean([float(torch.dot(ref, f)) for f in video])  # unit vectors: cosine = dot
    assert clip_image_score(ref, video) == pytest.approx(loop, rel=1e-10)
    assert clip_orbit(ref, video) == pytest.approx(loop, rel=1e-10)
    assert clip_front(ref, video, front_view=2) == pytest.approx(float(torch.dot(ref, video[2])), rel=1e-10)
    text = embedder.texts(["a cat"])[0]
    assert clip_text_score(text, video) == pytest.approx(np.mean([float(torch.dot(text, f)) for f in video]), rel=1e-10)


def test_identical_views_score_one_and_front_beats_orbit(embedder):
    views = embedder.images(frames(3, n=6))
    assert clip_front(views[0], views, 0) == pytest.approx(1.0)
    assert clip_image_score(views[0], views[:1].repeat(4, 1)) == pytest.approx(1.0)
    assert clip_orbit(views[0], views) < clip_front(views[0], views, 0)  # other views differ from the front
    with pytest.raises(ValueError, match="front_view=6"):
        clip_front(views[0], views, 6)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ClipModelNotFoundError, match="eval.clip.model"):
        ClipEmbedder(None)
    with pytest.raises(ClipModelNotFoundError, match="no config.json"):
        ClipEmbedder(tmp_path)
