"""gridgen.runtime: the auto device, the W&B mode, the default cache folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gridgen.runtime import default_cache_dir, resolve_device, wandb_offline


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
