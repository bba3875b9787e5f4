"""`python -m gridgen.generate` and `make generate` as a user runs them: i2v with a LoRA and a literal prompt,
bad input and garbage LoRA files as one line and exit 2, no folder left by a failure, the default sweep folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers.generate import run_cli
from tests.helpers.lora import foreign_files
from tests.helpers.paths import ROOT


def test_a_failed_generate_leaves_no_folder(tmp_path):
    """A mistake (a LoRA that does not exist) is one line, exit 2, and no outputs/generate/<date>/<time>_... folder
    of Hydra's files is left behind."""
    proc = run_cli("prompt=x", "lora=/no/such/lora", cwd=tmp_path)
    assert proc.returncode == 2 and "/no/such/lora" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "outputs").exists(), sorted(tmp_path.rglob("*"))


@pytest.mark.slow  # the README's i2v and LoRA generate commands run in CI
def test_cli_i2v_with_lora_and_literal_prompt(tmp_path, refs, lora_run):
    prompt = "a dog's tail, wagging [fast]"  # quoted for Hydra as the README shows: prompt="'a dog\\'s tail, ...'"
    proc = run_cli("task=i2v", "prompt='a dog\\'s tail, wagging [fast]'", f"ref={refs}/img/ref_0.png", f"lora={lora_run}",
                   "lora_scale=0.5",
                   "seed=5", "generate.steps=2", f"generate.out={tmp_path}/out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"output folder  {tmp_path}/out" in proc.stdout and "s per grid: sampling + decoding" in proc.stdout
    assert re.search(r"writing files [\d.]+ s", proc.stdout)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sample = manifest["samples"][0]
    assert sample["prompt"] == prompt and sample["seed"] == 5 and manifest["task"] == "i2v" and manifest["T"] == 0.9
    assert manifest["lora"]["scale"] == 0.5 and manifest["lora"]["rank"] == 4
    assert (tmp_path / "out" / sample["files"]["mp4"]).is_file() and (tmp_path / "out" / sample["files"]["gif"]).is_file()


def test_cli_bad_input_is_one_line_and_nonzero_exit(tmp_path, refs):
    proc = run_cli("task=interpolate", "prompt=x", f"ref={refs}/img", f"generate.out={tmp_path}/out", cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.generate: error:")]
    assert len(errors) == 1 and "too few keyframes for layout 4x4" in errors[0] and "Traceback" not in proc.stderr


def test_make_generate_echoes_the_values_it_passes():
    """`make generate` prints the command with the prompt's value (not `"prompt=$prompt"`), and that printed line,
    run by bash as make runs it, hands Hydra the typed values: prompt= and ref= quoted for Hydra by the Makefile."""
    prompt = 'a dog\'s tail, "wagging" [fast] & (more); 100% #1'
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "ARGS"}
    dry = subprocess.run(["make", "-n", "generate", f"prompt={prompt}", "ref=dog.png", "seed=3", "layout=4x8",
                          "generate.steps=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    recipe = re.sub(r"\\\n\s*", " ", dry.stdout)  # make echoes the recipe's continuation lines as written
    (line,) = [ln for ln in recipe.splitlines() if ln.startswith(".venv/bin/python -m gridgen.generate")]
    assert "$prompt" not in line and "prompt=" in line and "a dog" in line
    argv = subprocess.run(["bash", "+B", "-c", "printf '%s\\0' " + line.removeprefix(".venv/bin/python ")],
                          capture_output=True, text=True, timeout=60).stdout.split("\0")[:-1]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert argv[:2] == ["-m", "gridgen.generate"] and argv[3:] == ["ref='dog.png'", "layout=4x8", "seed=3",
                                                                   "generate.steps=1"]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(argv[2:])}
    assert parsed["prompt"] == prompt and parsed["ref"] == "dog.png"  # what Hydra reads is what was typed


@pytest.mark.slow
def test_cli_layout_hint_leads_to_the_large_refusal_not_a_run(tmp_path):
    """The issue's path: layout=100x100 is refused with `set generate.height=1600`; following that hint gives the
    large-grid refusal with its estimate (one line, exit 2, no output folder), not a 10,000-file run."""
    proc = run_cli("prompt=x", "layout=100x100", f"generate.out={tmp_path}/out", cwd=tmp_path)
    assert proc.returncode == 2 and "set generate.height=1600" in proc.stderr, proc.stderr[-2000:]
    proc = run_cli("prompt=x", "layout=100x100", "generate.height=1600", f"generate.out={tmp_path}/out", cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.generate: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "10,000 frames per grid" in errors[0] and "would take about" in errors[0] and "MB" in errors[0]
    assert "set generate.allow_large=true" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a multirun subprocess (~13 s); train's README sweep runs in CI
def test_cli_multirun_with_the_default_sweep_folder(tmp_path):
    """`generate -m` as the README prints it: no hydra.sweep.dir, no GRIDGEN_ROOT; outputs land under <cwd>/outputs."""
    env = {k: v for k, v in os.environ.items() if k != "GRIDGEN_ROOT"}
    proc = subprocess.run([sys.executable, "-m", "gridgen.generate", "-m", "seed=1,2", "prompt=x", "generate.steps=1"],
                          cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifests = sorted((tmp_path / "outputs" / "generate_sweeps").glob("*/*/manifest.json"))
    assert [m.parent.name for m in manifests] == ["0", "1"], proc.stdout[-2000:]
    seeds = [json.loads(m.read_text())["samples"][0]["seed"] for m in manifests]
    assert seeds == [1, 2] and all((m.parent / "000_x" / "grid.png").is_file() for m in manifests)


@pytest.mark.parametrize("name, message", [
    pytest.param("garbage.safetensors", "is not a readable safetensors file", marks=pytest.mark.slow),  # ~13 s
    ("garbage.ckpt", "is not a PyTorch zip checkpoint"),
])
def test_cli_garbage_lora_is_one_line_exit_2(tmp_path, name, message):
    path = foreign_files(tmp_path)[name]
    env = {**os.environ, "GRIDGEN_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "gridgen.generate", "prompt=x", f"lora={path}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.generate: error:")]
    assert len(errors) == 1 and message in errors[0] and str(path) in errors[0]
    assert "Traceback" not in proc.stderr and not list(tmp_path.glob("**/manifest.json"))
