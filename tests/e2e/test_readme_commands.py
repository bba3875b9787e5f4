"""Every command of the README's ```bash blocks (and its ```python block) runs as printed.

The commands are parsed from README.md at test time and classified by `tests/helpers/readme_commands.py` (`TABLE`): `run`
commands are executed by bash exactly as printed, in a temporary folder that is laid out like a checkout (symlinks
to the repository's Makefile, pyproject.toml and .venv, and `../shared` beside it), so `make train` resolves
`.venv` and writes `outputs/` there as it does in the repository root, with `GRIDGEN_ROOT` unset. `python -m`
commands run with the environment of `source .venv/bin/activate` (PATH and VIRTUAL_ENV). The only thing added is
shorter step counts (`STEP_ARGS`, through the Makefile's `ARGS` or appended to a `python -m` line). Placeholders
(`<run folder>`...) are replaced by the outputs of earlier commands (`SUBSTITUTIONS`); dog.png, keyframes/,
clip.mp4 and the real videos are created under the names the README prints. `compose` commands (FLUX.1-dev,
/data, GPUs) go through the entry points with Hydra's `--cfg job`, which proves their overrides exist and compose.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.paths import HELPERS
from tests.helpers.readme_commands import (
    FULL_GENERATE,
    FULL_TRAIN,
    README,
    RESUME,
    RESUME_STEP_ARGS,
    ROOT,
    STEP_ARGS,
    TABLE,
    Entry,
    entry_module,
    readme_blocks,
    readme_commands,
    split_env,
    substitute,
)

BY_COMMAND = {entry.command: entry for entry in TABLE}
SHARED = ROOT.parent / "shared"
PREPARE_DEMO = next(e.command for e in TABLE if "grid_demo_multiview" in e.command)


def test_every_readme_command_is_classified():
    printed = readme_commands()
    assert printed, f"no ```bash block found in {README}"
    unclassified = [c for c in printed if c not in BY_COMMAND]
    assert not unclassified, (
        "README commands not in tests/helpers/readme_commands.py TABLE; add each as Entry(<command>, 'run' | 'compose' | "
        "'skip', <why>) (run: executed as printed; compose: Hydra --cfg job; skip: a reason):\n  "
        + "\n  ".join(unclassified))
    stale = [e.command for e in TABLE if e.command not in printed]
    assert not stale, "TABLE entries whose command is no longer in the README (remove or update them):\n  " + \
        "\n  ".join(stale)


def test_parser_joins_continuations_and_strips_comments():
    text = "x\n```bash\nmake train \\\n  stage=fine   # a comment\n\nmake report run=a#b  # note\n```\n"
    assert readme_commands(text) == ["make train stage=fine", "make report run=a#b"]
    assert substitute("make report run=outputs/runs/<date>/<time>_coarse-t2v-flux_tiny",
                      {"train_run": "outputs/runs/x", "generate_out": "g"}) == "make report run=outputs/runs/x"
    assert split_env("A=1 B=/x make train") == ("A=1 B=/x ", "make train")
    assert entry_module("GRIDGEN_DATA=/d make sweep") == "gridgen.train"


# ---------------------------------------------------------------------------------------------------------------
# The workspace: a folder that looks like the repository root to `make`, with the files the README names
# ---------------------------------------------------------------------------------------------------------------
class Workspace:
    def __init__(self, base: Path) -> None:
        self.cwd = base / "main"
        self.cwd.mkdir(parents=True)
        for name in ("Makefile", "pyproject.toml", ".venv"):
            (self.cwd / name).symlink_to(ROOT / name)
        if SHARED.is_dir():
            (base / "shared").symlink_to(SHARED)
        env = {k: v for k, v in os.environ.items()
               if k not in ("GRIDGEN_ROOT", "ARGS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
        venv_bin = ROOT / ".venv" / "bin"  # what `source .venv/bin/activate` sets
        env.update(PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(ROOT / ".venv"))
        self.env = env
        self.values: dict[str, str] = {}
        self.results: dict[str, subprocess.CompletedProcess] = {}
        self.before: dict[str, set[Path]] = {}
        self._make_inputs()

    def _make_inputs(self) -> None:
        """The files the README's commands name: dog.png, keyframes/, clip.mp4, and real videos for `make eval`."""
        from gridgen.data.sources.video import write_video

        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(self.cwd / "dog.png")
        (self.cwd / "keyframes").mkdir()
        for k in range(4):  # one keyframe per row of the 4x4 default
            Image.fromarray(np.full((64, 64, 3), 60 * k, np.uint8)).save(self.cwd / "keyframes" / f"{k:02d}.png")
        write_video(self.cwd / "clip.mp4", moving_square(16, seed=1))
        (self.cwd / "real_videos").mkdir()
        for k in range(3):
            write_video(self.cwd / "real_videos" / f"video{k}.mp4", moving_square(16, seed=10 + k))

    def bash(self, command: str, extra_env: dict[str, str] | None = None, timeout: int = 900,
             shell: tuple[str, ...] = ("bash", "-c")):
        return subprocess.run([*shell, command], cwd=self.cwd, env={**self.env, **(extra_env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def make_shell(self) -> tuple[str, ...]:
        """The shell make runs recipe lines with: its SHELL and .SHELLFLAGS (from `make -p`)."""
        database = self.bash("make -pn help").stdout
        values = dict(re.findall(r"^(SHELL|\.SHELLFLAGS) :?= (.*)$", database, re.M))
        return (values.get("SHELL", "/bin/sh"), *shlex.split(values.get(".SHELLFLAGS", "-c")))

    def command_line(self, entry: Entry) -> tuple[str, dict[str, str]]:
        """The command bash runs and the environment it adds: placeholders replaced, step counts shortened."""
        command = substitute(entry.command, self.values)
        steps = RESUME_STEP_ARGS if "ckpt_path=" in command else STEP_ARGS.get(entry_module(command), "")
        if split_env(command)[1].startswith("make "):
            return command, {"ARGS": steps}
        return f"{command} {steps}".rstrip(), {}

    def run(self, command: str) -> subprocess.CompletedProcess:
        """Run a `run` entry once (its prerequisites first) and record the outputs later commands read."""
        if command in self.results:
            return self.results[command]
        entry = BY_COMMAND[command]
        for need in entry.needs:
            result = self.run(need)
            if result.returncode != 0:
                pytest.fail(f"{command!r} needs {need!r}, which failed (exit {result.returncode})")
        if "<generated videos>" in command:
            self._link_generated_videos()
        line, extra = self.command_line(entry)
        self.before[command] = set(self.cwd.glob("outputs/*/*/*")) | set(self.cwd.glob("outputs/*/*"))
        result = self.results[command] = self.bash(line, extra)
        if result.returncode == 0 and command == TRAIN_CMD:
            self.values["train_run"] = self.printed_path(result, "run folder")
        if result.returncode == 0 and command == GENERATE_T2V_CMD:
            self.values["generate_out"] = self.printed_path(result, "output folder")
        if result.returncode == 0 and command == FULL_TRAIN:
            self.values["full_run"] = self.printed_path(result, "run folder")
        return result

    def printed_path(self, result: subprocess.CompletedProcess, label: str) -> str:
        """The path a command printed after ``label``, relative to the workspace as a user would type it."""
        match = re.search(rf"^{label}\s+(\S+)", result.stdout, re.M)
        assert match, f"no '{label}' line in the output:\n{result.stdout[-3000:]}"
        path = Path(match.group(1))
        assert path.is_dir(), path
        assert path.resolve().is_relative_to(self.cwd.resolve()), f"{path} is outside the working folder"
        return str(path.resolve().relative_to(self.cwd.resolve()))

    def _link_generated_videos(self) -> None:
        """`<generated videos>`: a folder of the mp4 files written by the README's t2v `make generate` commands."""
        folder = self.cwd / "generated_videos"
        folder.mkdir(exist_ok=True)
        for k, command in enumerate((GENERATE_T2V_CMD, BY_COMMAND_4X8)):
            out = Path(self.printed_path(self.results[command], "output folder"))
            (mp4,) = sorted((self.cwd / out).glob("*/frames.mp4"))
            link = folder / f"generated{k}.mp4"
            if not link.exists():
                link.symlink_to(mp4.resolve())

    def new_paths(self, command: str, pattern: str) -> list[Path]:
        return sorted(p for p in self.cwd.glob(pattern) if p not in self.before[command])


def moving_square(frames: int, seed: int, size: int = 64) -> np.ndarray:
    """(T, H, W, 3) uint8: a coloured square moving across a dark background."""
    rng = np.random.default_rng(seed)
    video = np.full((frames, size, size, 3), rng.integers(0, 60), np.uint8)
    color = rng.integers(100, 255, 3)
    for t in range(frames):
        x = (t * 3 + seed) % (size - 16)
        video[t, 20:36, x:x + 16] = color
    return video


TRAIN_CMD = "make train"
GENERATE_T2V_CMD = 'make generate prompt="a red circle moves from left to right"'
BY_COMMAND_4X8 = 'make generate task=t2v prompt="..." layout=4x8'


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    stamp = subprocess.run(["make", "-q", ".venv/.installed"], cwd=ROOT, capture_output=True,
                           env={k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "ARGS"})
    if stamp.returncode != 0:
        pytest.fail("the README's make commands would reinstall .venv first (pyproject.toml is newer than "
                    ".venv/.installed): run `make setup` (make test does it)")
    return Workspace(tmp_path_factory.mktemp("readme"))


# ---------------------------------------------------------------------------------------------------------------
# Promised outputs of the `run` commands, checked where cheap
# ---------------------------------------------------------------------------------------------------------------
def _check_train(ws: Workspace, result) -> None:
    run = ws.cwd / ws.values["train_run"]
    assert ws.values["train_run"].startswith("outputs/runs/") and run.name.endswith("_coarse-t2v-flux_tiny"), run
    for name in ("config.yaml", "metrics/metrics.csv", "checkpoints/last.ckpt",
                 "lora/pytorch_lora_weights.safetensors", "summary.json"):
        assert (run / name).is_file(), f"{name} missing in {run}"
    assert list(run.glob("wandb/offline-run-*")), "no offline W&B run in the run folder"


def _check_report(ws: Workspace, result) -> None:
    report = ws.cwd / ws.values["train_run"] / "report"
    assert len(list(report.glob("*.png"))) >= 2 and list(report.glob("*.md")), sorted(report.glob("*"))


def _check_sweep(ranks: tuple[int, ...]):
    def check(ws: Workspace, result) -> None:
        want = {f"lora.rank={rank}" for rank in ranks}
        sweeps = [p for p in ws.cwd.glob("outputs/sweeps/*") if {q.name for q in p.glob("lora.rank=*")} == want]
        assert len(sweeps) == 1, f"expected one sweep folder with {sorted(want)} under outputs/sweeps: {sweeps}"
        for rank in ranks:
            assert (sweeps[0] / f"lora.rank={rank}" / "lora" / "pytorch_lora_weights.safetensors").is_file(), rank
        summary = (sweeps[0] / "sweep_summary.md").read_text()
        assert all(str(rank) in summary for rank in ranks), summary
    return check


def _check_prepare(ws: Workspace, result) -> None:
    out = ws.cwd / "outputs" / "shards" / "grid_demo"
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(out.glob("*.tar")), sorted(out.glob("*"))
    assert manifest, manifest


def _check_prepare_parts(ws: Workspace, result) -> None:
    """The partitioned demo holds the samples (keys and bytes) of the one-process demo prepare."""
    import webdataset as wds

    def samples(folder: Path) -> dict[str, dict[str, bytes]]:
        shards = [str(p) for p in sorted(folder.glob("train-*.tar"))]
        return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
                for s in wds.WebDataset(shards, shardshuffle=False)}

    out = ws.cwd / "outputs" / "shards" / "grid_demo_parts"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["parts"]["count"] == 2, manifest
    assert samples(out) == samples(ws.cwd / "outputs" / "shards" / "grid_demo") != {}


def _check_generate(layout: str | None = None, extra: str | None = None):
    def check(ws: Workspace, result) -> None:
        out = ws.cwd / ws.printed_path(result, "output folder")
        manifest = (out / "manifest.json").read_text()
        assert list(out.glob("*/grid.png")), sorted(out.glob("*"))
        if layout:
            assert re.search(rf"\b{layout}\b", manifest), f"layout {layout} not in the manifest"
        if extra:
            assert list(out.glob(extra)), f"no {extra} in {out}"
    return check


def _check_generate_lora(ws: Workspace, result) -> None:
    _check_generate()(ws, result)
    out = ws.cwd / ws.printed_path(result, "output folder")
    assert Path(ws.values["train_run"]).name in (out / "manifest.json").read_text(), "the manifest names no LoRA"


def _check_eval(ws: Workspace, result) -> None:
    scores = json.loads((ws.cwd / "outputs" / "eval" / "t2v.json").read_text())
    assert (ws.cwd / "outputs" / "eval" / "t2v.md").is_file()
    metrics = scores["metrics"]  # 3 real videos made here, 2 generated by the README's t2v commands
    assert np.isfinite(metrics["fvd"]) and metrics["fvd"] >= 0, metrics
    assert (metrics["fvd_n_real"], metrics["fvd_n_fake"]) == (3, 2), metrics


def _check_resume(ws: Workspace, result) -> None:
    child, parent = ws.printed_path(result, "run folder"), ws.values["train_run"]
    assert child != parent, "a finished run was continued in its own folder"
    record = json.loads((ws.cwd / child / "parent.json").read_text())
    assert record["parent_run"] == str((ws.cwd / parent).resolve())


def _check_full_train(ws: Workspace, result) -> None:
    run = ws.cwd / ws.values["full_run"]
    assert sorted(p.name for p in (run / "transformer").iterdir()) == ["config.json",
                                                                        "diffusion_pytorch_model.safetensors"]
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "lora").exists()


def _check_generate_full(ws: Workspace, result) -> None:
    _check_generate()(ws, result)
    out = ws.cwd / ws.printed_path(result, "output folder")
    model = json.loads((out / "manifest.json").read_text())["model"]
    assert model["transformer"] == f"{ws.values['full_run']}/transformer", model


def _check_runs(*suffixes: str):
    def check(ws: Workspace, result) -> None:
        for suffix in suffixes:
            runs = ws.new_paths(_command_of(ws, result), f"outputs/runs/*/*{suffix}")
            assert runs, f"no new run folder *{suffix}"
            assert (runs[-1] / "lora" / "pytorch_lora_weights.safetensors").is_file(), runs[-1]
    return check


def _command_of(ws: Workspace, result) -> str:
    return next(c for c, r in ws.results.items() if r is result)


CHECKS = {
    TRAIN_CMD: _check_train,
    "make report run=outputs/runs/<date>/<time>_coarse-t2v-flux_tiny": _check_report,
    "python -m gridgen.train -m lora.rank=4,8,16": _check_sweep((4, 8, 16)),
    "make sweep ranks=16,64,256": _check_sweep((16, 64, 256)),
    PREPARE_DEMO: _check_prepare,
    next(e.command for e in TABLE if "grid_demo_parts" in e.command): _check_prepare_parts,
    GENERATE_T2V_CMD: _check_generate("4x4"),
    BY_COMMAND_4X8: _check_generate("4x8"),
    RESUME: _check_resume,
    'make generate task=i2v prompt="a dog runs on the beach" ref=dog.png '
    "lora=outputs/runs/<date>/<time>_coarse-t2v-flux_tiny": _check_generate_lora,
    'make generate task=interpolate prompt="..." ref=keyframes/': _check_generate(),
    'make generate task=t2mv prompt="a white tiger in mid-stride"': _check_generate("4x6", "*/cameras.json"),
    'make generate task=edit prompt="..." ref=clip.mp4 T=0.85': _check_generate(),
    "make train experiment=multiview debug=tiny": _check_runs("_coarse-multiview-flux_tiny"),
    FULL_TRAIN: _check_full_train,
    FULL_GENERATE: _check_generate_full,
    "make curriculum task=multiview": _check_runs("_coarse-multiview-flux_tiny", "_fine-multiview-flux_tiny"),
    "make train stage=fine task=multiview": _check_runs("_fine-multiview-flux_tiny"),
    "make eval task=t2v eval.real=<real videos> eval.fake=<generated videos> [eval.out=<folder>]": _check_eval,
}


def _params(kind: str) -> list:
    return [pytest.param(e.command, id=e.command[:60], marks=() if e.ci else pytest.mark.slow)
            for e in TABLE if e.kind == kind]


@pytest.mark.parametrize("command", _params("run"))
def test_readme_run_command(workspace: Workspace, command: str):
    if "grid_demo_multiview" in command and not (SHARED / "data" / "grid_demo_multiview").is_dir():
        pytest.skip(f"{SHARED / 'data' / 'grid_demo_multiview'} (the README's prepare.src) is absent")
    result = workspace.run(command)
    line, extra = workspace.command_line(BY_COMMAND[command])
    assert result.returncode == 0, (
        f"README command failed (exit {result.returncode}): {command}\nran: {' '.join(f'{k}={shlex.quote(v)}' for k, v in extra.items())} "
        f"{line}\n--- stdout (end)\n{result.stdout[-3000:]}\n--- stderr (end)\n{result.stderr[-5000:]}")
    assert command in CHECKS, f"no output check for {command!r} in CHECKS"
    CHECKS[command](workspace, result)


# ---------------------------------------------------------------------------------------------------------------
# `compose`: the argv bash would give Python, composed by the entry points with `--cfg job` in one process
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def composed(workspace: Workspace) -> dict[str, list[dict]]:
    workspace.values.setdefault("train_run", "outputs/runs/2026-01-01/00-00-00_coarse-t2v-flux_tiny")
    workspace.values.setdefault("generate_out", "outputs/generate/2026-01-01/00-00-00_t2v-flux_tiny")
    workspace.values.setdefault("full_run", "outputs/runs/2026-01-01/00-00-01_coarse-t2v-flux_tiny")
    argvs, owners = [], []
    for entry in TABLE:
        if entry.kind != "compose":
            continue
        command = substitute(f"{entry.prefix} {entry.command}".strip(), workspace.values)
        env, command = split_env(command)  # NAME=value before the command: kept for make (--cfg job ignores it)
        if command.startswith("make "):
            dry = workspace.bash(env + "make -n " + command[len("make "):], {"ARGS": "--cfg job"})
            assert dry.returncode == 0, f"make -n {command}: {dry.stderr}"
            lines = [ln for ln in dry.stdout.splitlines() if ln.startswith(".venv/bin/python -m ")]
            assert lines, f"make -n {command} runs no gridgen entry point:\n{dry.stdout}"
            shell_lines = ["printf '%s\\0' " + ln[len(".venv/bin/python "):] for ln in lines]
            shell = workspace.make_shell()
        else:
            assert command.startswith("python -m "), command
            shell_lines = ["printf '%s\\0' " + command[len("python "):]]
            shell = ("bash", "-c")
        for shell_line in shell_lines:  # the shell does the quoting, escapes and expansions, as for the user
            printed = workspace.bash(shell_line, shell=shell)
            assert printed.returncode == 0, printed.stderr
            argvs.append(printed.stdout.split("\0")[:-1])
            owners.append(entry.command)
    proc = subprocess.run([sys.executable, str(HELPERS / "readme_commands.py"), "compose"],
                          input=json.dumps(argvs), cwd=workspace.cwd, env=workspace.env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results: dict[str, list[dict]] = {}
    for owner, points in zip(owners, json.loads(proc.stdout), strict=True):
        results.setdefault(owner, []).extend(points)
    return results


@pytest.mark.parametrize("command", _params("compose"))
def test_readme_compose_command(composed: dict[str, list[dict]], command: str):
    points = composed[command]
    assert points, command
    for point in points:
        assert point["rc"] == 0 and not point["mismatches"], (
            f"README command does not compose ({BY_COMMAND[command].why}): {command}\n"
            f"argv ({len(point['argv'])} words): {str(point['argv'])[:600]}\n{point['stderr'][-3000:]}\n"
            f"{point['stdout'][-1500:] if point['rc'] else ''}\n" + "\n".join(point["mismatches"][:3]))


@pytest.mark.parametrize("command", _params("skip"))
def test_readme_skipped_make_target_exists(workspace: Workspace, command: str):
    """Skipped commands are not run (see each reason), but a make target must exist."""
    assert BY_COMMAND[command].why
    if command.startswith("make "):
        dry = workspace.bash("make -n " + command[len("make "):])
        assert dry.returncode == 0, f"{command}: {dry.stderr}"


# ---------------------------------------------------------------------------------------------------------------
# The ```python block: a LoRA export loads into diffusers (on the tiny model; the hub id is not available offline)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_readme_python_block_loads_the_lora(workspace: Workspace):
    from gridgen.embedded import ensure_tiny_flux

    (block,) = [b for b in readme_blocks("python") if "load_lora_weights" in b]
    assert workspace.run(TRAIN_CMD).returncode == 0
    tiny = ensure_tiny_flux(os.environ["GRIDGEN_CACHE"])
    assert '"black-forest-labs/FLUX.1-dev"' in block, block
    code = substitute(block, workspace.values).replace('"black-forest-labs/FLUX.1-dev"', repr(str(tiny)))
    script = ("import torch\nfrom diffusers import FluxPipeline\n" + code +
              "\nassert pipe.get_list_adapters()['transformer'], pipe.get_list_adapters()\nprint('lora loaded')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=workspace.cwd, env=workspace.env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "lora loaded" in result.stdout, result.stderr[-3000:]
