"""The README's shell commands, parsed at test time, and how `tests/e2e/test_readme_commands.py` runs each one."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout (this file also runs as a script)
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` at a word start, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_blocks(lang: str, text: str | None = None) -> list[str]:
    """Bodies of the fenced code blocks of ``lang`` in the README."""
    text = README.read_text() if text is None else text
    return [m.group(2) for m in FENCE.finditer(text) if m.group(1) == lang]


def readme_commands(text: str | None = None) -> list[str]:
    """Every command of the README's ```bash blocks, in order: ``\\`` continuations joined, comments stripped."""
    commands = []
    for body in readme_blocks("bash", text):
        joined = re.sub(r"\s*\\\n\s*", " ", body)
        for line in joined.splitlines():
            line = strip_comment(line).strip()
            if line:
                commands.append(line)
    return commands


# ---------------------------------------------------------------------------------------------------------------
# The classification table: every README command, in the order the test runs them (a command that reads another's
# output comes after it). A README command not in this table, or an entry whose command left the README, fails
# `test_every_readme_command_is_classified`.
#   run      executed as printed (after the placeholder substitutions below) with only step counts shortened
#   compose  needs what cannot exist here (FLUX.1-dev, /data, GPUs): Hydra composes it with `--cfg job`
#   skip     not run, with the reason; a make target is still checked to exist (`make -n`)
# ---------------------------------------------------------------------------------------------------------------
class Entry:
    """One README command and how the test treats it."""

    def __init__(self, command: str, kind: str, why: str = "", *, ci: bool = True, needs: tuple[str, ...] = (),
                 prefix: str = "") -> None:
        assert kind in ("run", "compose", "skip"), kind
        self.command, self.kind, self.why, self.ci, self.needs, self.prefix = command, kind, why, ci, needs, prefix

    def __repr__(self) -> str:
        return f"Entry({self.command!r}, {self.kind!r})"


TRAIN = "make train"
GENERATE_T2V = 'make generate prompt="a red circle moves from left to right"'
GENERATE_4X8 = 'make generate task=t2v prompt="..." layout=4x8'
CURRICULUM = "make curriculum task=multiview"
NO_FLUX_DEV = "needs FLUX.1-dev under /models and a GPU"
MIX = "make train stage=coarse task=t2v data=video_mix"
RESUME = "make train ckpt_path=outputs/runs/<date>/<time>_coarse-t2v-flux_tiny trainer.max_steps=80"  # the README's `Overrides:` lines extend this command
FULL_TRAIN = "make train adapter=full"
FULL_GENERATE = 'make generate prompt="a red circle moves from left to right" model.transformer=<full run>/transformer'

TABLE: list[Entry] = [
    # --- CI part: at least one of each documented workflow, in dependency order
    Entry(TRAIN, "run", "prints the run folder; config, metrics, checkpoints, LoRA export exist"),
    Entry("make report run=outputs/runs/<date>/<time>_coarse-t2v-flux_tiny", "run", "<run>/report/*.png, summary",
          needs=(TRAIN,)),
    Entry("python -m gridgen.train -m lora.rank=4,8,16", "run", "outputs/sweeps/<time>/lora.rank=4|8|16 + summary"),
    Entry("make sweep ranks=16,64,256", "run", "outputs/sweeps/<time>/lora.rank=16|64|256 + summary"),
    Entry("make prepare data=grid_demo_multiview prepare.src=../shared/data/grid_demo_multiview "
          "prepare.out=outputs/shards/grid_demo", "run", "outputs/shards/grid_demo/manifest.json + shards"),
    Entry("python -m gridgen.prepare -m data=grid_demo_multiview prepare.src=../shared/data/grid_demo_multiview "
          "prepare.out=outputs/shards/grid_demo_parts prepare.parts=2 'prepare.part=range(0,2)'", "run",
          "2 parts, then the manifest: the same samples as the one-process demo prepare",
          needs=("make prepare data=grid_demo_multiview prepare.src=../shared/data/grid_demo_multiview "
                 "prepare.out=outputs/shards/grid_demo",)),
    Entry(GENERATE_T2V, "run", "manifest.json, grid.png, frames.mp4"),
    Entry(GENERATE_4X8, "run", "a 4x8 grid"),
    Entry("make eval task=t2v eval.real=<real videos> eval.fake=<generated videos> [eval.out=<folder>]", "run",
          "outputs/eval/t2v.json + t2v.md", needs=(GENERATE_T2V, GENERATE_4X8)),
    Entry(RESUME, "run", "continues the finished run in a new folder naming it", needs=(TRAIN,)),
    Entry('make generate task=i2v prompt="a dog runs on the beach" ref=dog.png '
          "lora=outputs/runs/<date>/<time>_coarse-t2v-flux_tiny", "run", "manifest names the LoRA", needs=(TRAIN,)),
    # --- slow part (`make test-slow`): the other variants of the same entry points
    Entry('make generate task=interpolate prompt="..." ref=keyframes/', "run", "manifest.json", ci=False),
    Entry('make generate task=t2mv prompt="a white tiger in mid-stride"', "run", "views + cameras.json", ci=False),
    Entry('make generate task=edit prompt="..." ref=clip.mp4 T=0.85', "run", "manifest.json", ci=False),
    Entry("make train experiment=multiview debug=tiny", "run", "a debug run folder", ci=False),
    Entry(FULL_TRAIN, "run", "<run>/transformer/ (config.json + safetensors), no LoRA", ci=False),
    Entry(FULL_GENERATE, "run", "manifest names the transformer folder", ci=False, needs=(FULL_TRAIN,)),
    Entry(CURRICULUM, "run", "a coarse and a fine multiview run", ci=False),
    Entry("make train stage=fine task=multiview", "run", "a fine run from the curriculum's coarse LoRA", ci=False,
          needs=(CURRICULUM,)),
    # --- composed only
    Entry("make train model=flux_dev model.pretrained=/models/FLUX.1-dev strategy=gpu data=shards "
          "data.train_shards=/data/webvid", "compose", NO_FLUX_DEV + " and shards under /data/webvid"),
    Entry("GRIDGEN_DATA=/data/shards make train experiment=video_coarse model.pretrained=/models/FLUX.1-dev",
          "compose", NO_FLUX_DEV + " and WebVid/TikTok shards"),
    Entry("make prepare data=webvid prepare.src=/data/webvid/results_10M_train.csv "
          "prepare.out=/data/shards/webvid-4x4 prepare.workers=16", "compose", "needs the WebVid download"),
    Entry("make prepare data=tiktok prepare.src=/data/TikTok_dataset prepare.out=/data/shards/tiktok-4x4",
          "compose", "needs the TikTok dataset"),
    Entry("make prepare data=objaverse prepare.src=/data/diffusion4d/renders prepare.out=/data/shards/objaverse-4x6 "
          "data.source.csv=/data/Cap3D.csv", "compose", "needs the Objaverse renders and Cap3D captions"),
    Entry("data.sources.tiktok.weight=0.05", "compose", "needs WebVid/TikTok shards", prefix=MIX),
    Entry("python -m gridgen.train data=video_mix \"data.sources.webvid.shards='pipe:aws s3 cp "
          "s3://bucket/webvid/train-{000000..010999}.tar -'\" data.allow_pipe=true", "compose",
          "needs S3 and WebVid shards"),
    Entry("data=shards data.train_shards=[/data/a,/data/b] data.weights=[3,1]", "compose", "needs shards in /data",
          prefix="make train"),
    Entry("make cache data=webvid model=flux_dev", "compose", NO_FLUX_DEV + " and WebVid shards"),
    Entry("make train model=flux_dev model.pretrained=/models/FLUX.1-dev adapter=full strategy=fsdp trainer.devices=8",
          "compose", NO_FLUX_DEV.replace("a GPU", "8 GPUs")),
    Entry("python -m gridgen.prepare -m hydra/launcher=slurm hydra.launcher.partition=cpu data=webvid "
          "prepare.src=/data/webvid/results_10M_train.csv prepare.out=/data/shards/webvid-4x4 prepare.workers=15 "
          "prepare.parts=64 'prepare.part=range(0,64)'", "compose", "needs SLURM and the WebVid download"),
    Entry("python -m gridgen.prepare data=webvid prepare.src=/data/webvid/results_10M_train.csv "
          "prepare.out=/data/shards/webvid-4x4 prepare.parts=64 prepare.merge=true", "compose",
          "needs the 64 parts of the line above"),
    Entry("python -m gridgen.cache -m hydra/launcher=slurm hydra.launcher.nodes=4 hydra.launcher.partition=gpu "
          "data=webvid model=flux_dev model.pretrained=/models/FLUX.1-dev", "compose",
          NO_FLUX_DEV + ", SLURM and WebVid shards"),
    Entry("torchrun --nproc-per-node 8 -m gridgen.cache data=webvid model=flux_dev "
          "model.pretrained=/models/FLUX.1-dev", "skip", "needs 8 GPUs, FLUX.1-dev and WebVid shards (tests/e2e/test_cache.py "
          "runs 2 CPU processes under torchrun)"),
    Entry("make train data=webvid model=flux_dev data.cached=true "
          "data.train_shards=outputs/cache/webvid-video-flux_dev", "compose", NO_FLUX_DEV + " and a WebVid cache"),
    Entry('python -m gridgen.generate model=flux_dev model.pretrained=/models/FLUX.1-dev task=i2v prompt="..." '
          "ref=img.png lora=<run>", "compose", NO_FLUX_DEV),
    Entry("python -m gridgen.evaluate task=i2v eval.real=data/tiktok100 eval.fake=outputs/generate/<run> "
          "eval.clip.model=/models/clip-vit-large-patch14", "compose", "needs TikTok-100 and a CLIP checkpoint"),
    Entry("python -m gridgen.evaluate task=i2v eval.generate=true eval.real=data/tiktok100 "
          "lora=outputs/runs/<run>/lora", "compose", "needs TikTok-100"),
    Entry("python -m gridgen.evaluate -m task=i2v eval.generate=true eval.real=data/tiktok100 "
          "lora=a.safetensors,b.safetensors", "compose", "needs TikTok-100 and two trained LoRAs"),
    Entry("python -m gridgen.evaluate -m task=interpolate eval.real=data/ucf_val "
          "eval.fake=runs/a/samples,runs/b/samples", "compose", "needs UCF-101 and two runs' samples"),
    # --- not run
    Entry("make mini", "skip", "about 2.5 hours on 2 cores (build 22 min, ablation ~130 min); tests/e2e/test_mini.py "
          "runs `make mini` at a toy size (slow)"),
    Entry("make mini stop_after=build", "skip", "about 22 min on 2 cores; the toy `make mini` of tests/e2e/test_mini.py "
          "runs every build step"),
    Entry("make train experiment=mini", "compose", "needs the base model `make mini` builds"),
    Entry("make test", "skip", "the CI suite itself (this test is part of it)"),
    Entry("make test-slow", "skip", "the slow suite (this test's slow part is part of it)"),
    Entry("make test-gpu", "skip", "needs CUDA"),
    Entry("make lint", "skip", "ruff over the tree: a style check, not a user workflow"),
    Entry("make bench", "skip", "takes minutes; tests/bench/ runs the benchmarks' checks"),
    Entry("make wheelhouse", "skip", "downloads about 230 MiB of wheels from PyPI"),
    Entry('make wheelhouse WHEEL_ONLY="diffusers hydra-core omegaconf antlr4-python3-runtime webdataset braceexpand av pytest pluggy iniconfig"',
          "skip", "downloads wheels from PyPI"),
    Entry("make setup WHEELHOUSE=.whl", "skip",
          "installs .venv from a wheelhouse (made by `make wheelhouse`); would replace the environment under test"),
]

# Placeholders and the paths that replace them: `outputs` of earlier commands (filled by the workspace) or files
# the workspace creates under the names the README prints (dog.png, keyframes/, clip.mp4 need no substitution).
# Longer patterns are replaced first.
SUBSTITUTIONS: dict[str, str] = {
    "outputs/runs/<date>/<time>_coarse-t2v-flux_tiny": "{train_run}",
    "outputs/runs/<date>/<time>_coarse-t2v-flux_dev": "{train_run}",  # the ```python block's LoRA folder
    "outputs/runs/<run>": "{train_run}",
    "outputs/generate/<run>": "{generate_out}",
    "<run>": "{train_run}",
    "<full run>": "{full_run}",  # the run folder `make train adapter=full` printed
    "<real videos>": "real_videos",
    "<generated videos>": "generated_videos",
    "[eval.out=<folder>]": "eval.out=outputs/eval",
}

# The one thing added to a run: shorter step counts, per entry point, through the Makefile's `ARGS` (which every
# target appends) or appended to a `python -m` command. Nothing else (no paths, logger, precision, sweep folder).
STEP_ARGS: dict[str, str] = {
    "gridgen.train": "trainer.max_steps=2 trainer.val_check_interval=2 trainer.log_every_n_steps=1",
    "gridgen.generate": "generate.steps=2",
}
# A resume continues a (shortened, 2-step) run: it is shortened to one step past it.
RESUME_STEP_ARGS = "trainer.max_steps=3 trainer.val_check_interval=3 trainer.log_every_n_steps=1"
MAKE_TARGET_MODULE = {"train": "gridgen.train", "curriculum": "gridgen.train", "sweep": "gridgen.train",
                      "generate": "gridgen.generate", "eval": "gridgen.evaluate", "report": "gridgen.report",
                      "prepare": "gridgen.prepare", "cache": "gridgen.cache"}


def substitute(command: str, values: dict[str, str]) -> str:
    """``command`` with every placeholder of :data:`SUBSTITUTIONS` replaced by ``values`` (``{train_run}`` ...)."""
    for pattern in sorted(SUBSTITUTIONS, key=len, reverse=True):
        if pattern in command:
            command = command.replace(pattern, SUBSTITUTIONS[pattern].format(**values))
    return command


ENV_PREFIX = re.compile(r"^((?:[A-Z_][A-Z0-9_]*=\S*\s+)*)(.*)$", re.S)


def split_env(command: str) -> tuple[str, str]:
    """``NAME=value ... rest`` -> (the environment assignments with their trailing space, the rest)."""
    env, rest = ENV_PREFIX.match(command).groups()
    return env, rest


def entry_module(command: str) -> str:
    """The gridgen entry point a README command runs (``make train`` -> ``gridgen.train``)."""
    words = split_env(command)[1].split()
    if words[0] == "make":
        return MAKE_TARGET_MODULE.get(words[1], "")
    if words[:2] == ["python", "-m"]:
        return words[2]
    return ""


# ---------------------------------------------------------------------------------------------------------------
# `compose`: the argv that the shell would hand to Python (from `make -n` with ARGS="--cfg job", or the `python -m`
# line), each run through the entry point's own `main` with Hydra's `--cfg job`, all in one process (one import of
# torch instead of one per command). Run as `python tests/helpers/readme_commands.py compose < argv.json`.
# ---------------------------------------------------------------------------------------------------------------
def _compose_all(argvs: list[list[str]]) -> list[list[dict]]:
    """Per argv, one result per composed point (``rc``, ``stdout``, ``stderr``, ``mismatches``)."""
    import contextlib
    import io
    import runpy
    import sys

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    parser = OverridesParser.create()
    results = []
    for argv in argvs:
        assert argv[0] == "-m", argv
        results.append([])
        module, args = argv[1], argv[2:]
        multirun = bool({"-m", "--multirun"} & set(args))
        args = [a for a in args if a not in ("-m", "--multirun")]
        if "--cfg" not in args:
            args += ["--cfg", "job"]
        # `--cfg` excludes `-m`: a multirun is composed once per point of its sweep (Hydra's own parser expands it)
        points = [args]
        if multirun:
            keys = [a for a in args if "=" in a and not a.startswith("-")]
            fixed = [a for a in args if a not in keys]
            points = [fixed]
            for override in parser.parse_overrides(keys):
                values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [
                    override.get_value_element_as_str()]
                prefix = override.get_key_element()
                points = [p + [f"{prefix}={v}"] for p in points for v in values]
        for point in points:
            out, err, rc = io.StringIO(), io.StringIO(), 0
            sys.argv = [module, *point]
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    runpy.run_module(module, run_name="__main__")
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except Exception as exc:  # noqa: BLE001 - reported per command
                rc, err = 1, io.StringIO(err.getvalue() + f"{type(exc).__name__}: {exc}")
            finally:
                GlobalHydra.instance().clear()
            mismatches = []
            if rc == 0:
                try:
                    cfg = OmegaConf.create(out.getvalue())
                except Exception as exc:  # noqa: BLE001
                    rc, mismatches = 1, [f"--cfg job printed no config: {exc}"]
                else:
                    mismatches = _check_overrides(cfg, sys.argv[1:], parser)
            results[-1].append({"argv": [module, *point], "rewritten": sys.argv[1:], "rc": rc,
                            "stdout": out.getvalue(), "stderr": err.getvalue(), "mismatches": mismatches})
    return results


def _check_overrides(cfg, args: list[str], parser) -> list[str]:
    """Each ``key.sub=value`` override of ``args`` (after the entry point's rewriting) as set in ``cfg``."""
    from omegaconf import OmegaConf

    problems = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg or arg.split("=")[0].startswith(("hydra", "+", "~")):
            continue
        override = parser.parse_override(arg)
        key = override.key_or_group
        if "." not in key or override.package is not None:
            continue  # a config group choice (model=flux_dev): its files composed or Hydra failed
        node = OmegaConf.select(cfg, key, default="<missing>", throw_on_resolution_failure=False)
        got = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
        want = override.value()
        if got != want and str(got) != str(want):
            problems.append(f"{key}: printed config has {got!r}, the command set {want!r}")
    return problems


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:] != ["compose"]:
        raise SystemExit("usage: python tests/helpers/readme_commands.py compose < argv.json")
    payload = json.load(sys.stdin)
    json.dump(_compose_all(payload), sys.__stdout__)
