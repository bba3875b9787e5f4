"""The one safe decoder: broken samples skipped and counted (in workers too), pickled members never unpickled,
cached tensors passed through, uint8 hand-over equal to the float pipeline, JPEG decoding into shared batches."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds

from gridgen.data import GridDataModule
from tests.helpers.shards import (
    TouchOnUnpickle,
    batch_keys,
    cached_sample,
    one_epoch,
    pickle_payloads,
    write_shard,
)


def _raw_samples(shard: Path) -> list[dict]:
    """Undecoded samples (bytes) of a shard, ready to be written again."""
    return [
        {k: v for k, v in s.items() if k in ("__key__", "png", "json", "txt")}
        for s in wds.WebDataset(str(shard), shardshuffle=False)
    ]


def test_corrupt_samples_are_skipped_and_counted(shards, tmp_path, caplog):
    root, _ = shards
    good = _raw_samples(root / "video" / "train-000000.tar")  # 4 samples
    truncated = dict(good[0], __key__="truncated-png", png=good[0]["png"][: len(good[0]["png"]) // 2])
    no_layout = dict(good[1], __key__="no-layout", json=b'{"kind": "video"}')
    write_shard(tmp_path / "val-000000.tar", good[:2] + [truncated] + good[2:] + [no_layout])
    write_shard(tmp_path / "train-000000.tar", good[:2] + [truncated] + good[2:] + [no_layout])

    dm = GridDataModule(tmp_path, val_shards=tmp_path, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="gridgen.data"):
        batches = one_epoch(dm.val_dataloader())
        assert not caplog.records  # no line per broken sample
        dm.log_skips()
    assert sorted(sum(batch_keys(batches), [])) == sorted(s["__key__"] for s in good)
    assert dm.num_skipped == 2
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("data: skipped 2 broken samples: undecodable_member=1 (e.g. sample 'truncated-png': member "
                           "'png' cannot be decoded"), line
    assert "bad_layout=1 (e.g. sample 'no-layout': sample json has no 'rows'/'cols'" in line and line.endswith("2 in all")

    # training goes on too (the resampled stream meets the broken samples again and again)
    train = one_epoch(dm.train_dataloader())
    assert len(train) == dm.batches_per_epoch == 6 // 2  # count_samples counts the broken keys too
    assert dm.num_skipped > 2


def test_skip_count_is_shared_with_workers(shards, tmp_path):
    root, _ = shards
    good = _raw_samples(root / "video" / "train-000001.tar")
    broken = dict(good[0], __key__="broken", png=b"\x89PNG not really")
    write_shard(tmp_path / "val-000000.tar", good[:2] + [broken])
    write_shard(tmp_path / "val-000001.tar", good[2:] + [dict(broken, __key__="broken2")])
    dm = GridDataModule(root / "video", val_shards=tmp_path, batch_size=2, num_workers=2)
    keys = sorted(sum(batch_keys(one_epoch(dm.val_dataloader())), []))
    assert keys == sorted(s["__key__"] for s in good)
    assert dm.num_skipped == 2  # counted in the worker processes, visible here


def test_cached_tensors_pass_through(shards, tmp_path):
    """Tensor members in a format read without pickle (npy with allow_pickle=False) pass through under their name."""
    root, _ = shards
    good = _raw_samples(root / "video" / "val-000000.tar")
    samples = []
    for i, s in enumerate(good):
        buffer = io.BytesIO()
        np.save(buffer, np.full((16, 16, 16), float(i), dtype=np.float32))
        samples.append(dict(s, **{"latents.npy": buffer.getvalue()}))
    write_shard(tmp_path / "val-000000.tar", samples)
    dm = GridDataModule(tmp_path, val_shards=tmp_path, batch_size=3, cached=True)
    (batch,) = one_epoch(dm.val_dataloader())
    assert batch["latents.npy"].shape == (3, 16, 16, 16)
    assert batch["latents.npy"][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert batch["pixel_values"].shape == (3, 3, 128, 128)

    # latents only (no image): layout from the json, no pixel_values
    write_shard(tmp_path / "val-000000.tar", [{k: v for k, v in s.items() if k != "png"} for s in samples])
    (batch,) = one_epoch(dm.val_dataloader())
    assert "pixel_values" not in batch and batch["layout"]["rows"] == 4
    assert batch["latents.npy"].shape == (3, 16, 16, 16)


def _stream(dm: GridDataModule) -> list[str]:
    keys = [k for batch in dm.val_dataloader() for k in batch["__key__"]]
    keys += [k for batch in dm.train_dataloader() for k in batch["__key__"]]
    return keys


def test_pickle_members_of_plain_shards_are_never_unpickled(video_samples, tmp_path):
    marker = tmp_path / "pwned"
    samples = [dict(s, **pickle_payloads(marker)) for s in video_samples]
    for split in ("train", "val"):
        write_shard(tmp_path / "shards" / f"{split}-000000.tar", samples)
    dm = GridDataModule(tmp_path / "shards", val_shards=tmp_path / "shards", batch_size=2, shuffle_buffer=1)
    keys = _stream(dm)
    assert not marker.exists()
    assert sorted(keys[:4]) == sorted(s["__key__"] for s in video_samples) and len(keys) == 4 + 2 * 2
    assert dm.num_skipped == 0  # the samples train; only the foreign members are dropped, and counted
    assert dm.num_ignored == 2 * len(keys)


def test_pickle_members_of_cached_shards_are_never_unpickled(video_samples, tmp_path):
    """data.cached=true decodes every member of a known format: a .pyd/.pickle member ran code here before."""
    marker = tmp_path / "pwned"
    samples = [dict(cached_sample(s, i), **pickle_payloads(marker)) for i, s in enumerate(video_samples)]
    # a numpy member holding a pickled object array: refused (allow_pickle=False), that sample is skipped
    buffer = io.BytesIO()
    np.save(buffer, np.array([TouchOnUnpickle(marker)], dtype=object), allow_pickle=True)
    samples.append(dict(cached_sample(video_samples[0], 9), __key__="evil-npy", **{"extra.npy": buffer.getvalue()}))
    for split in ("train", "val"):
        write_shard(tmp_path / "cache" / f"{split}-000000.tar", samples)
    dm = GridDataModule(tmp_path / "cache", val_shards=tmp_path / "cache", batch_size=2, shuffle_buffer=1,
                        cached=True)
    val = list(dm.val_dataloader())
    train = list(dm.train_dataloader())
    assert not marker.exists()
    assert [k for b in val for k in b["__key__"]] == [s["__key__"] for s in video_samples]  # evil-npy skipped
    assert sorted(b["latents"][:, 0, 0].tolist() for b in val) == [[0.0, 1.0], [2.0, 3.0]]  # decoded, by key
    assert all(b["latents"].shape[1:] == (64, 64) for b in val + train) and len(train) == 5 // 2
    assert dm.num_skipped >= 1 and dm.num_ignored >= 2 * 4


def test_uint8_handover_is_exactly_the_float_pipeline(root):
    """Workers hand over uint8 (4x fewer bytes); the float made later equals the one made in the pipeline."""
    from gridgen.data.datamodule import pixels_to_float

    dm = GridDataModule(root / "video", val_shards=[root / "video", root / "multiview"], batch_size=2)
    floats = list(dm.val_dataset())
    uint8 = list(dm.val_dataset(float_pixels=False))
    assert all(b["pixel_values"].dtype == torch.uint8 for b in uint8)
    for a, b in zip(floats, uint8, strict=True):
        converted = pixels_to_float(dict(b))["pixel_values"]
        assert converted.dtype == torch.float32 and torch.equal(converted, a["pixel_values"])
        assert converted.min() >= -1 and converted.max() <= 1
    assert pixels_to_float({"pixel_values": torch.tensor([0, 255], dtype=torch.uint8)})["pixel_values"].tolist() == [-1, 1]

    # attached to a Trainer the loader yields uint8 (made float by on_after_batch_transfer); alone it yields float
    attached = GridDataModule(root / "video", batch_size=2, samples_per_epoch=4)
    attached.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert next(iter(attached.train_dataloader()))["pixel_values"].dtype == torch.uint8
    alone = GridDataModule(root / "video", batch_size=2, samples_per_epoch=4)
    assert next(iter(alone.train_dataloader()))["pixel_values"].dtype == torch.float32


@pytest.mark.parametrize("decoder", ["pil", "simplejpeg"])
def test_workers_decode_jpegs_into_shared_batches_with_the_same_pixels(root, tmp_path, decoder):
    """1 worker, attached to a Trainer: channels-last uint8 batches decoded straight into shared memory (PIL, or
    simplejpeg into the batch itself), a corrupt JPEG body skipped, pixels equal to the float pipeline's."""
    import io

    from PIL import Image

    from gridgen.data.datamodule import pixels_to_float

    pytest.importorskip(decoder if decoder != "pil" else "PIL")
    samples = []
    for s in wds.WebDataset(str(root / "video" / "val-000000.tar"), shardshuffle=False):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(s["png"])).save(buffer, format="JPEG", quality=90)
        samples.append({"__key__": s["__key__"], "jpg": buffer.getvalue(), "json": s["json"], "txt": s["txt"]})
    broken = dict(samples[0], __key__="broken-jpg", jpg=samples[0]["jpg"][:600])  # header intact, body cut
    with wds.TarWriter(str(tmp_path / "val-000000.tar"), mtime=0) as sink:
        for sample in [samples[0], broken, *samples[1:]]:
            sink.write(sample)
    reference = {k: p for b in GridDataModule(tmp_path, val_shards=tmp_path, batch_size=2).val_dataset()
                 for k, p in zip(b["__key__"], b["pixel_values"], strict=True)}
    dm = GridDataModule(tmp_path, val_shards=tmp_path, batch_size=2, num_workers=1, image_decoder=decoder)
    dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["__key__"]]
    assert keys == [s["__key__"] for s in samples] and dm.num_skipped == 1  # the broken one, nothing else
    for batch in batches:
        pixels = batch["pixel_values"]
        assert pixels.dtype == torch.uint8 and pixels.shape[-1] == 3  # (B, H, W, 3) as decoded
        converted = pixels_to_float(dict(batch))["pixel_values"]  # (B, 3, H, W) float, as on the device
        for key, image in zip(batch["__key__"], converted, strict=True):
            # the same libjpeg-turbo decode either way; 1/127.5 allows an IDCT rounding difference between builds
            assert (image - reference[key]).abs().max() <= 1 / 127.5 + 1e-6, key
