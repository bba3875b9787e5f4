"""Per-video metrics: PSNR / SSIM (interpolation), temporal consistency, and the Inception Score with C3D.

* PSNR and SSIM (torchmetrics) are computed per frame on RGB in [0, 1] (``data_range=1.0``, i.e. 255 on uint8)
  and then averaged: over the frames of a video, then over videos. SSIM uses torchmetrics' defaults (Gaussian
  11x11 window, sigma 1.5, K = (0.01, 0.03)). A prediction of another size than its target is resized
  (bilinear) to the target's size, and the caller states it.
* Temporal consistency: the mean cosine similarity of the embeddings of consecutive frames,
  ``1/(T-1) sum_t cos(e_t, e_{t+1})`` (CLIP image embeddings in gridgen.evaluate).
* Inception Score, TGANv2 protocol for UCF-101: a C3D classifier fine-tuned on UCF-101's 101 classes reads 16
  frames at 112x112 (frames resized to 128x171, centre-cropped), ``IS = exp(E_x KL(p(y|x) || p(y)))``
  computed on ``splits`` equal parts and reported as mean and standard deviation over the parts. C3D is
  implemented here (Tran et al. 2015, the layer names of the common PyTorch port: conv1 ... conv5b, fc6 ...
  fc8); weights are not shipped by any package, so IS runs only when ``eval.is.c3d`` points at a state dict
  or a TorchScript file. The input convention (mean, channel order) belongs to the weights and is configurable.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


# ---------------------------------------------------------------------------------------------- PSNR / SSIM
def _unit_range(frames: torch.Tensor) -> torch.Tensor:
    """float64 in [0, 1]: SSIM's variances E[x^2] - E[x]^2 lose digits in float32."""
    return frames.double() / 255.0 if frames.dtype == torch.uint8 else frames.double()


def match_size(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``pred`` resized (bilinear) to ``target``'s height and width when they differ."""
    if pred.shape[-2:] == target.shape[-2:]:
        return pred
    resized = F.interpolate(_unit_range(pred), size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False)
    return (resized * 255).round().clamp(0, 255).to(torch.uint8) if pred.dtype == torch.uint8 else resized


def psnr_per_frame(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR of each frame ``(T, 3, H, W)`` (uint8, or float in [0, data_range]) -> ``(T,)`` in dB."""
    if pred.shape != target.shape:
        raise ValueError(f"PSNR needs equal shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return peak_signal_noise_ratio(_unit_range(pred), _unit_range(target), data_range=data_range,
                                   reduction="none", dim=(1, 2, 3))


def ssim_per_frame(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM of each frame ``(T, 3, H, W)`` -> ``(T,)``."""
    if pred.shape != target.shape:
        raise ValueError(f"SSIM needs equal shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return structural_similarity_index_measure(_unit_range(pred), _unit_range(target), data_range=data_range,
                                               reduction="none")


# ---------------------------------------------------------------------------------------------- temporal
def temporal_consistency(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity of consecutive frame embeddings ``(T, D)``, T >= 2."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"temporal consistency needs (T >= 2, D) embeddings, got {tuple(embeddings.shape)}")
    e = F.normalize(embeddings.double(), dim=-1)
    return float((e[:-1] * e[1:]).sum(-1).mean())


# ---------------------------------------------------------------------------------------------- Inception Score
def inception_score(probs: np.ndarray | torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """``exp(E_x KL(p(y|x) || p(y)))`` per split of ``probs (N, C)``; returns (mean, std) over the splits."""
    p = probs.detach().cpu().double().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) < splits:
        raise ValueError(f"IS needs (N >= splits={splits}, classes) probabilities, got shape {p.shape}")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1)  # KL(p(y|x) || p(y))
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------- C3D
C3D_FRAMES, C3D_RESIZE, C3D_CROP = 16, (128, 171), 112
C3D_WIDTHS = (64, 128, 256, 512, 512)  # conv1, conv2, conv3, conv4, conv5 output channels
UCF101_CLASSES = 101


class C3D(nn.Module):
    """C3D (Tran et al. 2015): 8 conv3x3x3 layers, 5 max-pools, fc6/fc7 (4096) and fc8 (classes).

    Input ``(B, 3, 16, 112, 112)`` -> logits ``(B, num_classes)``. ``widths`` / ``fc_dim`` shrink it for tests.
    """

    def __init__(self, num_classes: int = UCF101_CLASSES, widths: tuple[int, ...] = C3D_WIDTHS, fc_dim: int = 4096) -> None:
        super().__init__()
        w1, w2, w3, w4, w5 = widths

        def conv(cin: int, cout: int) -> nn.Conv3d:
            return nn.Conv3d(cin, cout, kernel_size=3, padding=1)

        self.conv1, self.conv2 = conv(3, w1), conv(w1, w2)
        self.conv3a, self.conv3b = conv(w2, w3), conv(w3, w3)
        self.conv4a, self.conv4b = conv(w3, w4), conv(w4, w4)
        self.conv5a, self.conv5b = conv(w4, w5), conv(w5, w5)
        self.pool1 = nn.MaxPool3d((1, 2, 2), (1, 2, 2))
        self.pool = nn.MaxPool3d(2, 2)
        self.pool5 = nn.MaxPool3d(2, 2, padding=(0, 1, 1))
        self.fc6 = nn.Linear(w5 * 4 * 4, fc_dim)  # pool5 of a 16x112x112 clip: (w5, 1, 4, 4)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.fc8 = nn.Linear(fc_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(x)))  # (B, w1, 16, 56, 56)
        x = self.pool(F.relu(self.conv2(x)))  # (B, w2, 8, 28, 28)
        x = self.pool(F.relu(self.conv3b(F.relu(self.conv3a(x)))))  # (B, w3, 4, 14, 14)
        x = self.pool(F.relu(self.conv4b(F.relu(self.conv4a(x)))))  # (B, w4, 2, 7, 7)
        x = self.pool5(F.relu(self.conv5b(F.relu(self.conv5a(x)))))  # (B, w5, 1, 4, 4)
        x = F.relu(self.fc6(x.flatten(1)))
        x = F.relu(self.fc7(x))  # dropout is identity at evaluation
        return self.fc8(x)


class C3DWeightsNotFoundError(FileNotFoundError):
    """IS was asked for without C3D weights."""


def load_c3d(path: str | Path | None, device: str | torch.device = "cpu") -> nn.Module:
    """C3D from a state dict (``.pt``/``.pth``/``.safetensors``, optionally under ``state_dict``) or TorchScript.

    Only from the path the user gave (``eval.is.c3d``; TorchScript can carry code, so it is never searched for);
    a pickled state dict is read with ``weights_only=True`` (tensors only, no code)."""
    if not path:
        raise C3DWeightsNotFoundError(
            "IS needs a C3D classifier fine-tuned on UCF-101 (TGANv2 protocol), which no package ships; set "
            "eval.is.c3d=<state dict or TorchScript file> or leave 'is' out of eval.metrics")
    path = Path(path).expanduser()
    if not path.is_file():
        raise C3DWeightsNotFoundError(f"C3D weights '{path}' do not exist; set eval.is.c3d to a C3D UCF-101 file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            return torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError:  # not TorchScript: a pickled state dict
            state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    widths = tuple(int(state[f"{n}.weight"].shape[0]) for n in ("conv1", "conv2", "conv3a", "conv4a", "conv5a"))
    model = C3D(num_classes=int(state["fc8.weight"].shape[0]), widths=widths, fc_dim=int(state["fc6.weight"].shape[0]))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def preprocess_c3d(videos: torch.Tensor, mean: tuple[float, float, float] | None = None, channels: str = "rgb",
                   frames: int = C3D_FRAMES) -> torch.Tensor:
    """uint8 ``(B, T, 3, H, W)`` -> C3D input ``(B, 3, 16, 112, 112)``: first 16 frames, resize to 128x171,
    centre crop 112, values in [0, 255] minus the per-channel ``mean`` (in ``channels`` order)."""
    if videos.shape[1] < frames:
        raise ValueError(f"IS (C3D) needs {frames} frames per video, got {videos.shape[1]}")
    batch = videos.shape[0]
    x = videos[:, :frames].reshape(batch * frames, *videos.shape[2:]).float()  # (B*16, 3, H, W)
    x = F.interpolate(x, size=C3D_RESIZE, mode="bilinear", align_corners=False)
    top, left = (C3D_RESIZE[0] - C3D_CROP) // 2, (C3D_RESIZE[1] - C3D_CROP) // 2
    x = x[..., top:top + C3D_CROP, left:left + C3D_CROP]
    if channels == "bgr":
        x = x.flip(1)
    elif channels != "rgb":
        raise ValueError(f"eval.is.channels must be rgb or bgr, got {channels!r}")
    if mean is not None:
        x = x - torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.reshape(batch, frames, 3, C3D_CROP, C3D_CROP).transpose(1, 2)  # (B, 3, 16, 112, 112)


class C3DProbabilities:
    """Callable: uint8 videos ``(B, T, 3, H, W)`` -> class probabilities ``(B, classes)`` (softmax of the logits)."""

    def __init__(self, path: str | Path | None, device: str | torch.device = "cpu",
                 mean: tuple[float, float, float] | None = None, channels: str = "rgb", outputs: str = "logits") -> None:
        if outputs not in ("logits", "probs"):
            raise ValueError(f"eval.is.outputs must be logits or probs, got {outputs!r}")
        self.device = torch.device(device)
        self.model = load_c3d(path, self.device)
        self.mean, self.channels, self.outputs = mean, channels, outputs

    @torch.inference_mode()
    def __call__(self, videos: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``(B, T, 3, H, W)`` uint8, or a list of ``(T, 3, H, W)`` of any sizes -> ``(B, classes)`` float64."""
        x = torch.cat([preprocess_c3d(clip.unsqueeze(0).to(self.device), self.mean, self.channels) for clip in videos])
        out = self.model(x).double().cpu()
        return out if self.outputs == "probs" else out.softmax(dim=-1)
