"""Hand-made WebDataset shards and the batches a GridDataModule streams from them, including samples that carry
pickled payloads (a payload that writes a marker file iff something unpickles it)."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
import webdataset as wds
from PIL import Image

from gridgen.data import GridDataModule
from gridgen.layout import GridLayout

KINDS = {"video": (4, 4), "multiview": (4, 6)}


def one_epoch(loader) -> list[dict]:
    return list(loader)


def batch_keys(batches: list[dict]) -> list[list[str]]:
    return [b["__key__"] for b in batches]


def train_batches(dm: GridDataModule, count: int | None = None) -> list[dict]:
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if count is not None and len(batches) == count:
            break
    return batches


def kind_of(key: str) -> str:
    return key.split("-")[0]


class TouchOnUnpickle:
    """Unpickling this calls ``open(path, "w")``: the marker file appears iff something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def write_shard(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)


def pickle_payloads(marker: Path) -> dict[str, bytes]:
    live = pickle.dumps(TouchOnUnpickle(marker))
    probe = marker.with_name("probe")
    pickle.loads(pickle.dumps(TouchOnUnpickle(probe)))  # the payload is live: unpickling does write the file
    assert probe.exists()
    probe.unlink()
    return {"extra.pyd": live, "extra.pickle": live}


def cached_sample(sample: dict, index: int) -> dict:
    """A ``make cache``-format sample (``cache.safetensors`` + json + txt) built by hand, no image."""
    meta = json.loads(sample["json"])
    layout = GridLayout(meta["rows"], meta["cols"], meta["cell_height"], meta["cell_width"])
    tensors = {"latents": torch.full((layout.num_tokens, 64), float(index)), "prompt_embeds": torch.zeros(8, 4),
               "pooled_prompt_embeds": torch.zeros(4), "text_mask": torch.ones(8, dtype=torch.uint8)}
    return {"__key__": sample["__key__"], "cache.safetensors": safetensors.torch.save(tensors),
            "json": sample["json"], "txt": sample["txt"]}


def setup_error(dm: GridDataModule, stage: str = "fit") -> str:
    with pytest.raises(ValueError) as info:
        dm.setup(stage)
    message = str(info.value)
    assert "\n" not in message
    return message


def grid_with_cells(sample: dict, cell: int) -> dict:
    """The sample re-drawn as a 4x4 grid of ``cell`` px cells (a hand-made shard), json saying so."""
    image = Image.open(io.BytesIO(sample["png"])).convert("RGB").resize((4 * cell, 4 * cell))
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    meta = {**json.loads(sample["json"]), "cell_height": cell, "cell_width": cell}
    return dict(sample, png=buffer.getvalue(), json=json.dumps(meta).encode())
