"""Configs, paper targets and data cards are package data: a wheel carries them and every entry point composes
from an installed gridgen with no checkout around it (``pip install .`` without ``-e``, as a container build does).

The fast check builds the wheel from a copy of the sources and compares its file list with the tree; the slow one
installs that wheel into a fresh venv outside the checkout and runs each console script with Hydra's ``--cfg job``.
A source tree that was never pip-installed imports too (version ``0.1.0+src``).
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT

PACKAGE = ROOT / "src" / "gridgen"
DATA_DIRS = ("conf", "data_cards")
# console script -> (its config, an override only that config knows, proving the right tree was composed)
ENTRY_POINTS = {
    "gridgen-train": "experiment=debug",
    "gridgen-prepare": "data=webvid",
    "gridgen-cache": "cache.batch_size=2",
    "gridgen-generate": "task=t2v",
    "gridgen-evaluate": "task=t2v",
    "gridgen-report": "run=/nonexistent/run",
    "gridgen-mini": "stop_after=build",
}
# Entry points that compose their configs with Hydra's compose API instead of @hydra.main (they run the others' functions)
COMPOSING_ENTRY_POINTS = ["mini.__main__"]


def package_data_files() -> set[str]:
    """Every non-Python file under the package's data folders, as its path inside the wheel."""
    files = set()
    for name in DATA_DIRS:
        for path in (PACKAGE / name).rglob("*"):
            if path.is_file() and path.suffix != ".py" and "__pycache__" not in path.parts:
                files.add(path.relative_to(PACKAGE.parent).as_posix())
    return files


def build_wheel(tmp: Path) -> Path:
    """`pip wheel --no-deps --no-build-isolation` of a copy of the sources (the build folder stays out of the
    checkout)."""
    src = tmp / "src_copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = wheels.glob("gridgen-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_holds_every_config_card_and_paper_target(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = package_data_files()
    assert {"gridgen/conf/train.yaml", "gridgen/conf/paper_targets.yaml", "gridgen/conf/experiment/debug.yaml",
            "gridgen/conf/prepare/prepare.yaml", "gridgen/data_cards/webvid.md"} <= expected
    missing = sorted(expected - names)
    assert not missing, f"package data left out of the wheel (fix [tool.setuptools.package-data]): {missing}"


def test_every_entry_point_is_a_console_script(wheel):
    """The wheel's console scripts are exactly the ``@hydra.main`` modules of the package (and the composing runners),
    one each."""
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser(delimiters=("=",))
        parser.optionxform = str
        parser.read_string(zf.read(name).decode())
    scripts = dict(parser["console_scripts"])
    modules = sorted([p.stem for p in PACKAGE.glob("*.py") if re.search(r"^@hydra\.main\(", p.read_text(), re.M)]
                     + COMPOSING_ENTRY_POINTS)
    assert sorted(scripts) == sorted(ENTRY_POINTS)
    assert sorted(v.strip().removesuffix(":main").removeprefix("gridgen.") for v in scripts.values()) == modules


@pytest.mark.slow
def test_installed_wheel_composes_every_entry_point(wheel, tmp_path):
    """A venv outside the checkout, gridgen itself from the wheel only: every console script composes its config
    from the installed package. The venv reads torch and the other dependencies from this venv's site-packages as a
    plain path (a .pth line), so the editable install's own .pth (the checkout's src/) is not processed there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    (site_packages,) = (venv / "lib").glob("python*/site-packages")
    deps = [p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir()]
    (site_packages / "_dependencies.pth").write_text("".join(f"{p}\n" for p in deps))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300)
    work = tmp_path / "elsewhere"  # not the checkout: nothing to find by walking up
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import gridgen, gridgen.config as c, gridgen.data.cards as d; "
                            "print(gridgen.__file__); print(c.CONF_DIR); print(d.CARDS_DIR)"],
                           cwd=work, capture_output=True, text=True, check=True, timeout=120).stdout.split()
    assert len(where) == 3 and all(p.startswith(str(site_packages)) for p in where), where
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1"}
    for script, override in ENTRY_POINTS.items():
        proc = subprocess.run([str(venv / "bin" / script), "--cfg", "job", override], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{script}: {proc.stderr[-2000:]}"
        key, _, value = override.partition("=")
        assert value in proc.stdout, f"{script} --cfg job {override}: {proc.stdout[:2000]}"
    assert not list(work.iterdir())  # --cfg job writes nothing


def test_source_tree_import_without_pip_metadata(tmp_path):
    (tmp_path / "src" / "gridgen").mkdir(parents=True)  # a source tree that was never pip-installed
    for name in ("__init__.py", "_quiet.py"):
        (tmp_path / "src" / "gridgen" / name).write_text((ROOT / "src" / "gridgen" / name).read_text())
    code = "import sys; sys.path.insert(0, 'src'); import gridgen; print(gridgen.__version__)"
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "0.1.0+src", proc.stderr
