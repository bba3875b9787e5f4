"""CLIP metrics on a tiny random CLIP built from transformers configs, saved and loaded back (no hub)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gridgen.embedded.tokenizers import caption_corpus, write_clip_tokenizer_files
from gridgen.eval.clip import (
    ClipEmbedder,
    ClipModelNotFoundError,
    clip_front,
    clip_image_score,
    clip_orbit,
    clip_text_score,
)


def make_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random CLIPModel (2 layers, width 32, 32 px images) with its image processor and a CLIP BPE tokenizer."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer_files(folder, caption_corpus(), num_merges=40)  # gridgen's tiny-FLUX CLIP tokenizer
    vocab = json.loads((folder / "vocab.json").read_text())
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


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
