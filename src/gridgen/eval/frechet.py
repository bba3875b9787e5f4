"""Fréchet distance between two Gaussians fitted to features (FVD with I3D features), in float64.

    FD = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr( (S_1^{1/2} S_2 S_1^{1/2})^{1/2} )

The trace term uses the identity tr((S_1 S_2)^{1/2}) = tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2}): both square roots are
of symmetric positive semi-definite matrices, so they come from symmetric eigen-decompositions (``eigh``) with
negative round-off eigenvalues clamped to 0; no complex ``sqrtm``. The result is clamped at 0.

Statistics are float64 and mergeable: :class:`FeatureStats` keeps (n, mean, M2 = sum (x - mean)(x - mean)^T)
and merges two sets exactly with Chan et al.'s pairwise update, so batches, workers and ranks can be folded in
any order. The covariance is ``M2 / (n - 1)`` (unbiased, as ``numpy.cov`` and the TF-GAN code of the FVD
reference). With n below the feature dimension (400 for I3D) the covariance is rank-deficient and FD is biased
by n: values are only comparable at equal n and protocol, so every FVD is reported with its n.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class FeatureStats:
    """Running float64 mean and scatter of ``dim``-dimensional features; merge with ``+`` or :meth:`merge`."""

    n: int
    mean: np.ndarray  # (D,)
    m2: np.ndarray  # (D, D): sum over samples of (x - mean)(x - mean)^T

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor) -> FeatureStats:
        x = _as_float64(features)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {x.shape}")
        if len(x) == 0:
            return cls.empty(x.shape[1])
        mean = x.mean(axis=0)
        centred = x - mean
        return cls(len(x), mean, centred.T @ centred)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Chan et al.'s pairwise combination: exact, order-independent up to round-off."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}")
        if other.n == 0:
            return FeatureStats(self.n, self.mean.copy(), self.m2.copy())
        if self.n == 0:
            return FeatureStats(other.n, other.mean.copy(), other.m2.copy())
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
        return FeatureStats(n, mean, m2)

    __add__ = merge

    def update(self, features: np.ndarray | torch.Tensor) -> FeatureStats:
        """Return the statistics with a batch of features ``(B, D)`` added."""
        return self.merge(FeatureStats.from_features(features))

    def covariance(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        return self.m2 / (self.n - 1)

    # ---- distributed ----------------------------------------------------------------------------------
    def all_reduce(self) -> FeatureStats:
        """Merge the statistics of every rank (``torch.distributed``); identity when not distributed."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        gathered: list[FeatureStats | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self)
        total = FeatureStats.empty(self.dim)
        for stats in gathered:  # rank order: every rank gets bit-identical results
            total = total.merge(stats)
        return total

    # ---- files ------------------------------------------------------------------------------------------
    def save(self, path: str | Path, **meta: str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:  # a file handle: numpy would otherwise append .npz to other suffixes
            np.savez(f, n=np.int64(self.n), mean=self.mean, m2=self.m2, **{f"meta_{k}": np.str_(v) for k, v in meta.items()})
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        with np.load(path, allow_pickle=False) as data:  # a stats file from elsewhere is data, never code
            if not {"n", "mean", "m2"} <= set(data.files):
                raise ValueError(f"'{path}' is not a gridgen feature-statistics file (needs n, mean, m2)")
            return cls(int(data["n"]), data["mean"].astype(np.float64), data["m2"].astype(np.float64))

    @staticmethod
    def load_meta(path: str | Path) -> dict[str, str]:
        with np.load(path, allow_pickle=False) as data:  # a stats file from elsewhere is data, never code
            return {k.removeprefix("meta_"): str(data[k]) for k in data.files if k.startswith("meta_")}


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) positive semi-definite matrix; negative eigenvalues -> 0."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S_1 S_2)^{1/2}) = sum sqrt(eig(S_1^{1/2} S_2 S_1^{1/2})), eigenvalues clamped at 0."""
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    values = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FD between N(mu1, sigma1) and N(mu2, sigma2), float64, clamped at 0."""
    mu1, mu2, sigma1, sigma2 = (_as_float64(a) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean, a.covariance(), b.mean, b.covariance())


def frechet_distance_from_features(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    return frechet_distance_from_stats(FeatureStats.from_features(x), FeatureStats.from_features(y))
