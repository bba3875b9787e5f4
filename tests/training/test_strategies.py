"""Distributed strategies on CPU (gloo, 2 processes): DDP and FSDP2 end with the LoRA of one process with the
doubled batch."""

import os
import subprocess
import sys

import pytest
import torch

from gridgen.models.lora import read_lora_file
from tests.helpers.paths import HELPERS


def test_ddp_two_processes_match_one_process_with_double_batch(tmp_path):
    """strategy=ddp on CPU (gloo, 2 processes, batch 2 each) == 1 process with batch 4, same LoRA."""
    script = HELPERS / "ddp_equivalence.py"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for devices, batch, name in ((2, 2, "ddp"), (1, 4, "single")):
        proc = subprocess.run([sys.executable, str(script), str(devices), str(batch), str(tmp_path / name)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, _ = read_lora_file(tmp_path / "ddp")
    single, _ = read_lora_file(tmp_path / "single")
    # B starts at zero, so |B| is the size of the training update; DDP's all-reduce sums in another order, so
    # allow float32 noise of 0.1% of the update (a per-rank noise or a wrong gradient average moves it ~100%).
    update = max(v.abs().max().item() for k, v in single.items() if "lora_B" in k)
    assert update > 1e-3  # the LoRA moved
    assert ddp.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-3 * update, msg=key)


@pytest.mark.slow  # 2 gloo processes + 1 (~45 s); DDP's 2-process check stays in CI
def test_fsdp2_two_processes_match_one_process_with_clipping(tmp_path):
    """strategy=fsdp (FSDP2, gloo, 2 processes x batch 2) == 1 process x batch 4, with gradient clipping active
    (clip far below the gradient norm: a per-shard norm would clip each rank differently) and the LoRA
    gathered from both ranks' shards for the export."""
    script = HELPERS / "ddp_equivalence.py"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for devices, batch, name in ((2, 2, "fsdp"), (1, 4, "single")):
        proc = subprocess.run([sys.executable, str(script), str(devices), str(batch), str(tmp_path / name), "fsdp",
                               "1e-3"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    fsdp, _ = read_lora_file(tmp_path / "fsdp")
    single, _ = read_lora_file(tmp_path / "single")
    update = max(v.abs().max().item() for k, v in single.items() if "lora_B" in k)
    assert update > 1e-4 and fsdp.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(fsdp[key], single[key], rtol=0, atol=1e-3 * update, msg=key)
