"""The offline cluster install, checked without a GPU (these run in CI): ``make setup WHEELHOUSE=<dir>`` installs
with ``--no-index`` onto the torch already there, and ``scripts/wheelhouse.py`` finds gridgen's dependencies
without torch's. The download itself needs PyPI: the slow test."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def load_wheelhouse():
    spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "scripts" / "wheelhouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_dry_run(*args: str) -> str:
    """``make -n -B`` in the repository: the commands a target would run, none of them run."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    proc = subprocess.run(["make", "-n", "-B", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def pip_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "pip install" in line]


# ---- make setup WHEELHOUSE= -------------------------------------------------------------------------------
def test_setup_with_wheelhouse_is_offline_and_keeps_the_installed_torch(tmp_path):
    venv = tmp_path / "venv"
    online = make_dry_run("setup", f"VENV={venv}")
    assert any("torch==" in line for line in pip_lines(online))  # the control: without WHEELHOUSE torch is installed

    offline = make_dry_run("setup", "WHEELHOUSE=/x", f"VENV={venv}")
    lines = pip_lines(offline)
    assert lines and all("--no-index" in line and "--find-links /x" in line for line in lines), lines
    assert not any("torch" in line.split("pip install", 1)[1] for line in lines), lines  # no TORCH_SPEC, no upgrade
    assert not any("--upgrade pip" in line for line in lines)
    assert f"-m venv --system-site-packages {venv}" in offline  # the venv sees the machine's torch
    assert any('-e ".[dev]"' in line for line in lines)

    only = make_dry_run("setup", "WHEELHOUSE=/x", "WHEEL_ONLY=diffusers av", f"VENV={venv}")
    lines = pip_lines(only)
    assert any(line.endswith("--find-links /x diffusers av") for line in lines), lines
    assert any(line.endswith("--no-deps -e .") for line in lines), lines  # the rest is on the machine already
    assert all("--no-index" in line for line in lines)


def test_wheelhouse_target_passes_its_options():
    out = make_dry_run("wheelhouse", "WHEELHOUSE=/y", "WHEEL_PYTHON=3.12", "WHEEL_ONLY=diffusers av")
    assert "scripts/wheelhouse.py --dest /y" in out and "--python-version 3.12" in out
    assert "--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64" in out and '--only "diffusers av"' in out
    assert "--dest .whl" in make_dry_run("wheelhouse")


def test_wheelhouse_variables_are_not_hydra_overrides():
    out = make_dry_run("train", "WHEELHOUSE=/x", "WHEEL_ONLY=av", "lora.rank=8")
    (line,) = [line for line in out.splitlines() if "gridgen.train" in line]
    assert "lora.rank=8" in line and "WHEEL" not in line


# ---- the closure without torch ---------------------------------------------------------------------------
FAKE_INDEX = {  # name -> {version: requires_dist}, a small index in the shape pip's report gives
    "app": {"1.0": ["lib>=1", "torch>=2", "win-only; sys_platform == 'win32'", "old; python_version < '3.10'",
                    "extra-dep; extra == 'fast'"]},
    "lib": {"1.0": [], "2.0": ["leaf", "lib-plugin[fast]"], "3.0": ["leaf"]},
    "lib-plugin": {"1.0": ["extra-dep; extra == 'fast'", "never; extra == 'other'"]},
    "leaf": {"0.1": [], "0.2": []},
    "extra-dep": {"1.0": []},
    "weights": {"1.0": ["jax"]},
    "torch": {"2.5": ["nvidia-cudnn", "filelock"]},
    "setuptools": {"80.0": []},
    "wheel": {"0.45": []},
}


def fake_pick(requirements: dict[str, list[str]], target: list[str], work: Path) -> dict[str, dict]:
    """What pip would pick from FAKE_INDEX: the newest version meeting every specifier given for a name."""
    picked = {}
    for name, specs in requirements.items():
        allowed = SpecifierSet(",".join(s for s in specs if s))
        version = max((v for v in FAKE_INDEX[name] if Version(v) in allowed), key=Version)
        picked[name] = {"name": name, "version": version, "requires_dist": FAKE_INDEX[name][version], "is_wheel": True}
    return picked


def test_resolution_leaves_out_torch_and_follows_markers_and_extras(monkeypatch):
    wheelhouse = load_wheelhouse()
    monkeypatch.setattr(wheelhouse, "pick_versions", fake_pick)
    monkeypatch.setattr(wheelhouse, "NO_DEPS", {"weights"})
    picked = wheelhouse.resolve([Requirement("app"), Requirement("lib<3"), Requirement("weights")], "3.12",
                                ["manylinux_2_28_x86_64"])
    # torch and what it pulls (nvidia-cudnn, filelock) are the target's; win32/py<3.10 markers do not apply;
    # lib-plugin[fast] brings its "fast" extra, app's own "fast" extra was not asked for; weights' deps are not followed
    assert {n: d["version"] for n, d in picked.items()} == {
        "app": "1.0", "lib": "2.0", "leaf": "0.2", "lib-plugin": "1.0", "extra-dep": "1.0", "weights": "1.0"}


def test_only_names_outside_the_closure_is_one_clear_error(tmp_path):
    wheelhouse = load_wheelhouse()
    picked = fake_pick({"leaf": [], "setuptools": [], "wheel": []}, [], tmp_path)  # the build backend is always in
    with pytest.raises(wheelhouse.WheelhouseError, match=r"WHEEL_ONLY names nope, which gridgen does not need"):
        wheelhouse.build(picked, ["nope"], tmp_path / "whl", "3.12", ["manylinux_2_28_x86_64"])


@pytest.mark.slow
def test_make_wheelhouse_downloads_and_builds_wheels(tmp_path):
    """Needs PyPI: antlr4-python3-runtime 4.9.3 is an sdist (built here, pure Python), braceexpand a wheel."""
    proc = subprocess.run(["make", "wheelhouse", "WHEEL_PYTHON=3.12", f"WHEELHOUSE={tmp_path}",
                           "WHEEL_ONLY=antlr4-python3-runtime braceexpand"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.glob("*.whl"))
    assert any(n.startswith("antlr4_python3_runtime-4.9.3-") and n.endswith("-none-any.whl") for n in names), names
    assert any(n.startswith("braceexpand-") for n in names), names
    assert any(n.startswith("setuptools-") for n in names), names  # the build backend of `pip install -e .`
