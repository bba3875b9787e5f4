"""gridgen.runtime: the auto device, glibc's malloc for CPU compute, the W&B mode, the default cache folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gridgen import runtime
from gridgen.runtime import MALLOC_ENV, default_cache_dir, resolve_device, tune_cpu_process, wandb_offline


@pytest.mark.parametrize("cuda", [False, True])
def test_auto_device_follows_cuda(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    for name in ("auto", "", None):
        assert resolve_device(name, "generate.device") == torch.device("cuda" if cuda else "cpu")
    assert resolve_device("auto", "cache.device", local_rank=3) == torch.device("cuda:3" if cuda else "cpu")
    assert resolve_device("cpu", "eval.device") == torch.device("cpu")


def test_a_missing_or_unknown_device_is_refused_with_its_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^eval\.device=cuda:1 but no CUDA device .* use eval\.device=cpu$"):
        resolve_device("cuda:1", "eval.device")
    with pytest.raises(ValueError, match=r"^generate\.device=gpu0 is not a device"):
        resolve_device("gpu0", "generate.device")


@pytest.mark.parametrize(("env", "offline"), [({}, True), ({"WANDB_MODE": "offline"}, True),
                                              ({"WANDB_MODE": "online"}, False), ({"WANDB_API_KEY": "k"}, False)])
def test_wandb_is_offline_unless_asked(monkeypatch, env, offline):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert wandb_offline() is offline


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GRIDGEN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("GRIDGEN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "gridgen"
    assert default_cache_dir() == Path("~/.cache/gridgen").expanduser()


class _Libc:
    """glibc's mallopt, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_cpu_compute_fixes_glibcs_thresholds_unless_the_environment_sets_them(monkeypatch):
    """On the CPU: mmap threshold (M_MMAP_THRESHOLD = -3) 64 MiB, trim threshold (M_TRIM_THRESHOLD = -1) 1 GiB; not
    for a GPU process, not where the user's environment sets either threshold, not without glibc."""
    for key in MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    libc = _Libc()
    monkeypatch.setattr(runtime, "libc", lambda: libc)
    assert tune_cpu_process("cpu") is True and libc.calls == [(-3, 64 << 20), (-1, 1 << 30)]
    libc.calls.clear()
    assert tune_cpu_process(torch.device("cuda")) is False and libc.calls == []
    for key in MALLOC_ENV:
        monkeypatch.setenv(key, "1048576")
        assert tune_cpu_process("cpu") is False and libc.calls == []
        monkeypatch.delenv(key)
    monkeypatch.setattr(runtime, "libc", lambda: None)
    assert tune_cpu_process("cpu") is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_takes_the_thresholds():
    """The real mallopt accepts both settings (it returns 0 for a parameter it refuses)."""
    assert runtime.libc() is not None and runtime.tune_malloc() is True
