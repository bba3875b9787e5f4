"""Shard readers run nothing a shard carries, pipe: needs an opt-in, unusable shards fail in setup() in one line."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import webdataset as wds
from PIL import Image

from gridgen.data.datamodule import GridDataModule
from gridgen.embedded import write_sample_shards
from gridgen.layout import GridLayout


class _TouchOnUnpickle:
    """Unpickling this calls ``open(path, "w")``: the marker file appears iff something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> list[dict]:
    """4 undecoded 4x4 video samples (png, json, txt) of the embedded sample data."""
    root = tmp_path_factory.mktemp("raw")
    write_sample_shards(root, seed=0, num_video=4, num_multiview=2, num_val=2, samples_per_shard=4)
    return [{k: v for k, v in s.items() if k in ("__key__", "png", "json", "txt")}
            for s in wds.WebDataset(str(root / "video" / "train-000000.tar"), shardshuffle=False)]


def _write(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)


def _payloads(marker: Path) -> dict[str, bytes]:
    live = pickle.dumps(_TouchOnUnpickle(marker))
    probe = marker.with_name("probe")
    pickle.loads(pickle.dumps(_TouchOnUnpickle(probe)))  # the payload is live: unpickling does write the file
    assert probe.exists()
    probe.unlink()
    return {"extra.pyd": live, "extra.pickle": live}


def _stream(dm: GridDataModule) -> list[str]:
    keys = [k for batch in dm.val_dataloader() for k in batch["__key__"]]
    keys += [k for batch in dm.train_dataloader() for k in batch["__key__"]]
    return keys


def test_pickle_members_of_plain_shards_are_never_unpickled(raw, tmp_path):
    marker = tmp_path / "pwned"
    samples = [dict(s, **_payloads(marker)) for s in raw]
    for split in ("train", "val"):
        _write(tmp_path / "shards" / f"{split}-000000.tar", samples)
    dm = GridDataModule(tmp_path / "shards", val_shards=tmp_path / "shards", batch_size=2, shuffle_buffer=1)
    keys = _stream(dm)
    assert not marker.exists()
    assert sorted(keys[:4]) == sorted(s["__key__"] for s in raw) and len(keys) == 4 + 2 * 2
    assert dm.num_skipped == 0  # the samples train; only the foreign members are dropped, and counted
    assert dm.num_ignored == 2 * len(keys)


def _cached_sample(sample: dict, index: int) -> dict:
    """A ``make cache``-format sample (``cache.safetensors`` + json + txt) built by hand, no image."""
    meta = json.loads(sample["json"])
    layout = GridLayout(meta["rows"], meta["cols"], meta["cell_height"], meta["cell_width"])
    tensors = {"latents": torch.full((layout.num_tokens, 64), float(index)), "prompt_embeds": torch.zeros(8, 4),
               "pooled_prompt_embeds": torch.zeros(4), "text_mask": torch.ones(8, dtype=torch.uint8)}
    return {"__key__": sample["__key__"], "cache.safetensors": safetensors.torch.save(tensors),
            "json": sample["json"], "txt": sample["txt"]}


def test_pickle_members_of_cached_shards_are_never_unpickled(raw, tmp_path):
    """data.cached=true decodes every member of a known format: a .pyd/.pickle member ran code here before."""
    marker = tmp_path / "pwned"
    samples = [dict(_cached_sample(s, i), **_payloads(marker)) for i, s in enumerate(raw)]
    # a numpy member holding a pickled object array: refused (allow_pickle=False), that sample is skipped
    buffer = io.BytesIO()
    np.save(buffer, np.array([_TouchOnUnpickle(marker)], dtype=object), allow_pickle=True)
    samples.append(dict(_cached_sample(raw[0], 9), __key__="evil-npy", **{"extra.npy": buffer.getvalue()}))
    for split in ("train", "val"):
        _write(tmp_path / "cache" / f"{split}-000000.tar", samples)
    dm = GridDataModule(tmp_path / "cache", val_shards=tmp_path / "cache", batch_size=2, shuffle_buffer=1,
                        cached=True)
    val = list(dm.val_dataloader())
    train = list(dm.train_dataloader())
    assert not marker.exists()
    assert [k for b in val for k in b["__key__"]] == [s["__key__"] for s in raw]  # evil-npy skipped
    assert sorted(b["latents"][:, 0, 0].tolist() for b in val) == [[0.0, 1.0], [2.0, 3.0]]  # decoded, by key
    assert all(b["latents"].shape[1:] == (64, 64) for b in val + train) and len(train) == 5 // 2
    assert dm.num_skipped >= 1 and dm.num_ignored >= 2 * 4


# ---- unusable shards fail in setup() ----------------------------------------------------------------------


def _one_line_error(dm: GridDataModule, stage: str = "fit") -> str:
    with pytest.raises(ValueError) as info:
        dm.setup(stage)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_file_that_is_not_a_tar_fails_in_setup(raw, tmp_path):
    (tmp_path / "train-000000.tar").write_text("not a tar file\n")
    message = _one_line_error(GridDataModule(tmp_path))
    assert message.startswith(f"shard '{tmp_path / 'train-000000.tar'}' is not a readable tar file")
    assert message.endswith("re-create it with `make prepare` (or `make cache`) or remove it from data.train_shards")

    with tarfile.open(tmp_path / "train-000000.tar", "w"):
        pass  # a valid, empty tar
    assert _one_line_error(GridDataModule(tmp_path)).startswith(
        f"shard '{tmp_path / 'train-000000.tar'}' holds no samples;")

    # validation shards are checked too, and named as such
    _write(tmp_path / "good" / "train-000000.tar", raw)
    (tmp_path / "good" / "val-000000.tar").write_bytes(b"\x00" * 10)
    message = _one_line_error(GridDataModule(tmp_path / "good", val_shards=tmp_path / "good"))
    assert "val-000000.tar' is not a readable tar file" in message and "data.val_shards" in message


def _grid_with_cells(sample: dict, cell: int) -> dict:
    """The sample re-drawn as a 4x4 grid of ``cell`` px cells (a hand-made shard), json saying so."""
    image = Image.open(io.BytesIO(sample["png"])).convert("RGB").resize((4 * cell, 4 * cell))
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    meta = {**json.loads(sample["json"]), "cell_height": cell, "cell_width": cell}
    return dict(sample, png=buffer.getvalue(), json=json.dumps(meta).encode())


def test_cells_flux_cannot_take_fail_in_setup(raw, tmp_path):
    _write(tmp_path / "train-000000.tar", [_grid_with_cells(s, 30) for s in raw])
    message = _one_line_error(GridDataModule(tmp_path))
    assert message.startswith(f"shard '{tmp_path / 'train-000000.tar'}': none of its first 4 samples can be "
                              f"trained on; sample '{raw[0]['__key__']}': layout 4x4: cell_height must be a positive "
                              "multiple of 16 px")
    assert "got 30; pick e.g. 32" in message and message.endswith("or remove it from data.train_shards")
    # 32 px cells of the same hand-made kind are fine
    _write(tmp_path / "ok" / "train-000000.tar", [_grid_with_cells(s, 32) for s in raw])
    GridDataModule(tmp_path / "ok").setup("fit")


def test_cells_flux_cannot_take_on_the_command_line(raw, tmp_path):
    from tests.helpers.train import run_cli

    _write(tmp_path / "shards" / "train-000000.tar", [_grid_with_cells(s, 30) for s in raw])
    proc = run_cli("data=shards", f"data.train_shards={tmp_path / 'shards'}", "logger=csv", "trainer.max_steps=1",
                   f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.train: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "train-000000.tar': none of its first 4 samples" in errors[0] and "multiple of 16 px" in errors[0]


def test_corrupt_cache_fails_in_setup(raw, tmp_path):
    samples = [dict(_cached_sample(s, i), **{"cache.safetensors": b"\x00garbage"}) for i, s in enumerate(raw)]
    _write(tmp_path / "train-000000.tar", samples)
    message = _one_line_error(GridDataModule(tmp_path, cached=True))
    assert "none of its first 4 samples can be trained on" in message
    assert "member 'cache.safetensors' cannot be decoded" in message
    assert "rebuild the cache with `make cache data=<name> model=<name>`" in message

    # a damaged manifest is named as such
    _write(tmp_path / "c" / "train-000000.tar", [_cached_sample(s, i) for i, s in enumerate(raw)])
    (tmp_path / "c" / "cache.json").write_text('{"format": "gridgen-cache/1", ')
    model = {"name": "flux_tiny", "pretrained": "embedded:tiny", "max_sequence_length": 8}
    message = _one_line_error(GridDataModule(tmp_path / "c", cached=True, cache_model=model))
    assert message.startswith(f"cache manifest '{tmp_path / 'c' / 'cache.json'}' is unreadable")


def test_the_cache_writer_never_unpickles_its_source_shards(raw, tmp_path, monkeypatch):
    """`make cache` reads raw shards with the same safe decoder (encoders replaced: only the reading is tested)."""
    import gridgen.data.cache as cache_lib

    marker = tmp_path / "pwned"
    _write(tmp_path / "raw" / "train-000000.tar", [dict(s, **_payloads(marker)) for s in raw])

    def encode(pipe, samples, max_sequence_length):
        return [{"latents": torch.zeros(s["layout"].num_tokens, 64), "prompt_embeds": torch.zeros(max_sequence_length, 4),
                 "pooled_prompt_embeds": torch.zeros(4), "text_mask": torch.ones(max_sequence_length, dtype=torch.uint8)}
                for s in samples]

    monkeypatch.setattr(cache_lib, "encode_for_cache", encode)
    model = {"name": "flux_tiny", "pretrained": "embedded:tiny", "max_sequence_length": 8}
    manifest = cache_lib.cache_shards(None, {"train": [str(tmp_path / "raw" / "train-000000.tar")]}, tmp_path / "out",
                                      model)
    assert not marker.exists()
    assert manifest["counts"] == {"train": 4} and manifest["skipped"] == 0
    dm = GridDataModule(tmp_path / "out", batch_size=2, cached=True, cache_model=model)
    assert sum(len(b["__key__"]) for b in dm.train_dataloader()) == 4
