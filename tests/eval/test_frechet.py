"""Fréchet distance: closed-form cases, scipy's sqrtm route, mergeable float64 statistics, ranks."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.multiprocessing as mp

from gridgen.eval.frechet import (
    FeatureStats,
    frechet_distance,
    frechet_distance_from_features,
    frechet_distance_from_stats,
)


def features(seed: int, n: int = 300, dim: int = 12, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) * scale
    return rng.normal(size=(n, dim)) @ mixing + rng.normal(size=dim)


def scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """The classic route (pytorch-fid, TF-GAN): scipy.linalg.sqrtm of S1 S2, real part."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_identical_sets_give_zero():
    x = features(0)
    assert frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-8)


def test_pure_mean_shift_gives_squared_norm():
    x = features(1)
    shift = np.linspace(-2.0, 3.0, x.shape[1])
    assert frechet_distance_from_features(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_diagonal_covariances():
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 1.0, 0.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_symmetric():
    x, y = features(2), features(3, scale=2.0)
    assert frechet_distance_from_features(x, y) == pytest.approx(frechet_distance_from_features(y, x), rel=1e-10)


@pytest.mark.parametrize("n", [300, 40])
def test_agrees_with_scipy_sqrtm(n):
    x, y = features(4, n=n, dim=20), features(5, n=n, dim=20, scale=0.5)
    ours = frechet_distance_from_features(x, y)
    assert ours > 1.0
    assert ours == pytest.approx(scipy_frechet(x, y), rel=1e-7)


def test_rank_deficient_covariances_stay_finite_and_clamped():
    # N << D, as 30 objects with 400-d I3D features: covariances are singular, round-off can go negative
    for seed in range(5):
        x = features(seed, n=8, dim=40)
        value = frechet_distance_from_features(x, x)
        assert 0.0 <= value < 1e-6 and np.isfinite(value)
    x, y = features(10, n=8, dim=40), features(11, n=9, dim=40)
    assert frechet_distance_from_features(x, y) == pytest.approx(scipy_frechet(x, y), rel=1e-5)


def test_merged_statistics_equal_one_shot():
    x = features(6, n=101)
    one_shot = FeatureStats.from_features(x)
    chunks = [x[:1], x[1:30], x[30:31], x[31:77], x[77:]]
    forward = FeatureStats.empty(x.shape[1])
    for chunk in chunks:
        forward = forward.update(chunk)
    backward = FeatureStats.empty(x.shape[1])
    for chunk in reversed(chunks):
        backward = backward + FeatureStats.from_features(torch.from_numpy(chunk))
    for merged in (forward, backward):
        assert merged.n == 101
        np.testing.assert_allclose(merged.mean, x.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(merged.covariance(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(merged.m2, one_shot.m2, rtol=1e-10, atol=1e-10)
    y = features(7)
    assert frechet_distance_from_stats(forward, FeatureStats.from_features(y)) == pytest.approx(
        frechet_distance_from_features(x, y), rel=1e-10)


def test_float64_even_from_float32_features():
    x = torch.from_numpy(features(8)).float()
    stats = FeatureStats.from_features(x)
    assert stats.mean.dtype == np.float64 and stats.m2.dtype == np.float64


def test_save_load_roundtrip(tmp_path):
    stats = FeatureStats.from_features(features(9))
    path = stats.save(tmp_path / "real.stats", frames="16", resize="tf1")
    loaded = FeatureStats.load(path)
    assert loaded.n == stats.n
    np.testing.assert_array_equal(loaded.m2, stats.m2)
    assert FeatureStats.load_meta(path) == {"frames": "16", "resize": "tf1"}


def test_too_few_samples_and_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 samples"):
        FeatureStats.from_features(np.ones((1, 4))).covariance()
    with pytest.raises(ValueError, match="dimension 4 and 5"):
        FeatureStats.empty(4).merge(FeatureStats.empty(5))
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _rank_stats(rank: int, world: int, init_file: str, x: np.ndarray, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        merged = FeatureStats.from_features(x[rank::world]).all_reduce()
        queue.put((rank, merged.n, merged.mean, merged.m2))
    finally:
        torch.distributed.destroy_process_group()


def test_all_reduce_across_two_ranks_equals_one_process(tmp_path):
    x = features(12, n=31)
    ctx = mp.get_context("fork")  # no re-import of torch per process; nothing here has started threads that matter
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_stats, args=(r, 2, str(tmp_path / "init"), x, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    one_shot = FeatureStats.from_features(x)
    for _, n, mean, m2 in results:
        assert n == 31
        np.testing.assert_allclose(mean, one_shot.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m2, one_shot.m2, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(results[0][3], results[1][3])  # every rank holds the same numbers
