"""PSNR / SSIM, temporal consistency, the Inception Score and the C3D classifier."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gridgen.eval.metrics import (
    C3D,
    C3DProbabilities,
    C3DWeightsNotFoundError,
    inception_score,
    load_c3d,
    match_size,
    preprocess_c3d,
    psnr_per_frame,
    ssim_per_frame,
    temporal_consistency,
)

TINY_WIDTHS, TINY_FC = (4, 4, 8, 8, 8), 16


def frames(seed: int, t: int = 3, size: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (t, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ---- PSNR / SSIM -----------------------------------------------------------------------------------------
def test_psnr_per_frame_matches_formula():
    pred, target = frames(0), frames(1)
    expected = []
    for p, t in zip(pred, target, strict=True):  # 10 log10(range^2 / mse) per frame, range 1 on [0, 1]
        mse = ((p.double() / 255 - t.double() / 255) ** 2).mean()
        expected.append(10 * math.log10(1.0 / float(mse)))
    ours = psnr_per_frame(pred, target, data_range=1.0)
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5)


def test_ssim_identity_constant_images_and_noise():
    x = frames(2)
    np.testing.assert_allclose(ssim_per_frame(x, x).numpy(), 1.0, atol=1e-6)
    a, b = 0.2, 0.6  # constant images: SSIM = (2ab + C1) / (a^2 + b^2 + C1), the contrast term is C2/C2
    c1 = (0.01 * 1.0) ** 2
    pa, pb = torch.full((1, 3, 32, 32), a), torch.full((1, 3, 32, 32), b)
    assert float(ssim_per_frame(pa, pb)[0]) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-4)
    noisy = (x.float() + torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * 40).clamp(0, 255).to(torch.uint8)
    values = ssim_per_frame(noisy, x)
    assert (values < 0.9).all() and (values > 0).all()


def test_shape_mismatch_and_resize():
    with pytest.raises(ValueError, match="equal shapes"):
        psnr_per_frame(frames(0, size=24), frames(1, size=32))
    resized = match_size(frames(0, size=24), frames(1, size=32))
    assert resized.shape == (3, 3, 32, 32) and resized.dtype == torch.uint8


# ---- temporal consistency -------------------------------------------------------------------------------
def test_temporal_consistency_matches_loop():
    emb = torch.randn(6, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = np.mean([float(torch.dot(emb[t], emb[t + 1]) / (emb[t].norm() * emb[t + 1].norm())) for t in range(5)])
    assert temporal_consistency(emb) == pytest.approx(expected, rel=1e-10)
    assert temporal_consistency(emb[:1].repeat(4, 1)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="T >= 2"):
        temporal_consistency(emb[:1])


# ---- Inception Score -------------------------------------------------------------------------------------
def test_inception_score_closed_forms():
    one_hot = np.eye(5)[np.arange(50) % 5]  # confident and evenly spread over 5 classes: IS = 5
    assert inception_score(one_hot, splits=1)[0] == pytest.approx(5.0, rel=1e-9)
    mean, std = inception_score(one_hot, splits=10)
    assert mean == pytest.approx(5.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    assert inception_score(np.full((20, 7), 1 / 7), splits=2)[0] == pytest.approx(1.0)  # no confidence: 1
    one_class = np.eye(5)[np.zeros(20, dtype=int)]
    assert inception_score(one_class, splits=2)[0] == pytest.approx(1.0)  # no diversity: 1
    with pytest.raises(ValueError, match="N >= splits"):
        inception_score(one_hot[:5], splits=10)


def test_inception_score_matches_plain_kl():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(40, 6)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in (probs[:20], probs[20:]):
        py = part.mean(0)
        scores.append(math.exp(np.mean([sum(p[c] * math.log(p[c] / py[c]) for c in range(6)) for p in part])))
    mean, std = inception_score(torch.from_numpy(probs), splits=2)
    assert mean == pytest.approx(np.mean(scores), rel=1e-9) and std == pytest.approx(np.std(scores), rel=1e-6)


# ---- C3D -------------------------------------------------------------------------------------------------
def test_c3d_full_size_shapes():
    model = C3D()
    assert model.fc6.in_features == 8192 and model.fc8.out_features == 101  # the published C3D layer sizes
    tiny = C3D(widths=TINY_WIDTHS, fc_dim=TINY_FC)
    assert tiny(torch.zeros(2, 3, 16, 112, 112)).shape == (2, 101)


def test_preprocess_c3d_crop_mean_and_order():
    videos = torch.zeros(1, 20, 3, 64, 80, dtype=torch.uint8)
    videos[:, :, 0] = 200  # red
    x = preprocess_c3d(videos, mean=(10.0, 20.0, 30.0), channels="bgr")
    assert x.shape == (1, 3, 16, 112, 112)
    assert x[0, 2].unique().tolist() == [170.0]  # red is the last channel in bgr, minus its mean 30
    assert x[0, 0].unique().tolist() == [-10.0]
    with pytest.raises(ValueError, match="16 frames"):
        preprocess_c3d(videos[:, :8])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_c3d_loads_state_dicts_and_gives_probabilities(tmp_path, suffix):
    torch.manual_seed(0)
    model = C3D(widths=TINY_WIDTHS, fc_dim=TINY_FC).eval()
    path = tmp_path / f"c3d{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    else:
        save_file(model.state_dict(), str(path))
    loaded = load_c3d(path)
    x = torch.randn(2, 3, 16, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    classifier = C3DProbabilities(path, mean=(90.0, 98.0, 102.0), channels="bgr")
    videos = [frames(6, t=16, size=48), frames(7, t=18, size=40)]  # different sizes and lengths
    probs = classifier(videos)
    assert probs.shape == (2, 101)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, dtype=torch.float64))


def test_c3d_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(C3DWeightsNotFoundError, match="eval.is.c3d"):
        load_c3d(None)
    with pytest.raises(C3DWeightsNotFoundError, match="do not exist"):
        load_c3d(tmp_path / "c3d.pt")
