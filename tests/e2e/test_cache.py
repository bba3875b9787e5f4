"""`python -m gridgen.cache` as a user runs it: the cache and the `make train` overrides it prints; two ranks
under torchrun."""

from __future__ import annotations

import json
import os

import pytest

from gridgen.data.cache import CACHE_MANIFEST
from gridgen.train import train
from tests.helpers.cache import folder_bytes
from tests.helpers.train import make_cfg


def test_make_cache_command_line_and_its_training_advice(raw, tmp_path):
    """`python -m gridgen.cache ...` builds the cache and prints the `make train` overrides that use it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "gridgen.cache", f"data.train_shards={raw / 'video'}",
                           f"cache.out={tmp_path / 'cache'}", f"paths.root_dir={tmp_path}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "cache" / CACHE_MANIFEST).read_text())
    assert manifest["command"] == "make cache data=sample model=flux_tiny " \
                                  f"data.train_shards={raw / 'video'} cache.out={tmp_path / 'cache'} paths.root_dir={tmp_path}"
    assert manifest["counts"] == {"train": 8, "val": 2} and (tmp_path / "cache" / "cache.log").is_file()
    advice = next(line for line in proc.stdout.splitlines() if line.startswith("train with"))
    overrides = advice.split("make train ", 1)[1].split()
    assert overrides == ["data=sample", "model=flux_tiny", "data.cached=true", f"data.train_shards={tmp_path / 'cache'}",
                         f"data.val_shards={tmp_path / 'cache'}"]
    metrics = train(make_cfg(tmp_path / "run", *overrides, "trainer.max_steps=1"))
    assert metrics["train/loss"] > 0


@pytest.mark.slow
def test_torchrun_two_cpu_processes_equal_one(raw, tmp_path):
    """`torchrun --nproc-per-node 2 -m gridgen.cache ...` (RANK/WORLD_SIZE from torchrun, CPU) == one process."""
    import subprocess
    import sys

    args = ["data=sample", f"data.train_shards={raw}", "cache.batch_size=4", f"paths.root_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # one thread each: same float sums
    subprocess.run([sys.executable, "-m", "gridgen.cache", *args, f"cache.out={tmp_path / 'one'}"], check=True,
                   capture_output=True, cwd=tmp_path, timeout=600, env=env)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                           "gridgen.cache", *args, f"cache.out={tmp_path / 'two'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "(rank 0 of 2)" in output and "(rank 1 of 2)" in output  # two ranks, each loading its encoders
    assert f"cache          {tmp_path / 'two'} (12 train, 4 val samples, 0 skipped)" in proc.stdout  # the last one
    one, two = tmp_path / "one", tmp_path / "two"
    assert folder_bytes(two) == folder_bytes(one) and len(folder_bytes(one)) == 5  # 3 train + 2 val shards
    manifests = [json.loads((f / CACHE_MANIFEST).read_text()) for f in (one, two)]
    for m in manifests:
        m.pop("command")  # the command line differs (cache.out)
    assert manifests[0] == manifests[1] and manifests[0]["status"] == "complete"
