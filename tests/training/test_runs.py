"""Run decisions before training: the fine stage's coarse LoRA (stage.init_lora=auto), step counts that train
nothing."""

import pytest
import torch

from gridgen.models.lora import read_lora_file
from gridgen.train import train
from tests.helpers.train import TASKS, make_cfg, make_cfg_no_val


@pytest.mark.parametrize("task", TASKS)
def test_every_stage_runs_and_fine_starts_from_coarse_lora(tmp_path, task):
    runs = tmp_path / "outputs" / "runs"
    fine = make_cfg(tmp_path, "stage=fine", f"task={task}", "trainer.max_steps=2", "lora.rank=4",
                    f"paths.output_dir={runs / 'f'}")
    with pytest.raises(FileNotFoundError, match=f"make curriculum task={task}"):
        train(fine)  # no coarse LoRA yet
    coarse = make_cfg(tmp_path, f"task={task}", "trainer.max_steps=2", "optim.lr=1e-2", "lora.rank=4",
                      f"paths.output_dir={runs / 'c'}")
    train(coarse)
    train(fine)
    coarse_file = runs / "c" / "lora" / "pytorch_lora_weights.safetensors"
    _, header = read_lora_file(runs / "f" / "lora")
    assert header["gridgen_stage"] == "fine" and header["gridgen_task"] == task
    assert header["gridgen_init_lora"] == str(coarse_file)
    ckpt = torch.load(runs / "f" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["init_lora"] == str(coarse_file)


@pytest.mark.parametrize("steps", [0, -1])
def test_a_step_count_that_trains_nothing_or_never_ends_is_refused(tmp_path, steps):
    with pytest.raises(ValueError, match=rf"trainer.max_steps={steps} trains nothing or never ends"):
        train(make_cfg(tmp_path, f"trainer.max_steps={steps}"))
    assert not (tmp_path / "run").exists()


def test_init_lora_auto_matches_rank_and_skips_debug_and_unfinished_runs(tmp_path, caplog):
    runs = tmp_path / "outputs" / "runs"
    for name, extra in (("r4", ["lora.rank=4"]), ("r8", ["lora.rank=8"]), ("debug8", ["lora.rank=8", "debug_run=true"])):
        train(make_cfg_no_val(tmp_path, "trainer.max_steps=1", *extra, f"paths.output_dir={runs / name}"))
    unfinished = runs / "unfinished"
    train(make_cfg_no_val(tmp_path, "trainer.max_steps=1", "lora.rank=8", f"paths.output_dir={unfinished}"))
    (unfinished / "summary.json").unlink()
    (runs / "debug8" / "lora" / "pytorch_lora_weights.safetensors").touch()  # newest of all
    caplog.set_level("INFO", logger="gridgen.training.runs")
    fine = make_cfg_no_val(tmp_path, "stage=fine", "trainer.max_steps=1", "lora.rank=8", f"paths.output_dir={runs / 'fine'}")
    train(fine)
    _, meta = read_lora_file(runs / "fine" / "lora")
    assert meta["gridgen_init_lora"] == str(runs / "r8" / "lora" / "pytorch_lora_weights.safetensors")
    message = next(r.getMessage() for r in caplog.records if "starts from" in r.getMessage())
    assert "rank 4" in message and "debug run" in message and "unfinished run" in message, message
    with pytest.raises(FileNotFoundError, match="rank=16.*passed over"):
        train(make_cfg_no_val(tmp_path, "stage=fine", "trainer.max_steps=1", "lora.rank=16",
                       f"paths.output_dir={runs / 'fine16'}"))
