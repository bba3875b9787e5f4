"""Sample shards and the streaming GridDataModule, on tiny real WebDataset shards (seconds on one core)."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds

from gridgen.data import GridDataModule, count_samples, resolve_shards
from gridgen.embedded import ensure_sample_shards, write_sample_shards
from gridgen.embedded import sample_data as sample_mod
from gridgen.embedded.world import BACKGROUND_COLORS
from gridgen.layout import GridLayout

SMALL = dict(num_video=16, num_multiview=8, num_val=3, samples_per_shard=4)
SIZES = {"video": (128, 128), "multiview": (128, 192)}  # (H, W): 4x4 and 4x6 cells of 32 px


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shards")
    manifest = write_sample_shards(root, seed=0, **SMALL)
    return root, manifest


def _tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isreg()})


def _epoch(loader) -> list[dict]:
    return list(loader)


def _keys(batches: list[dict]) -> list[list[str]]:
    return [b["__key__"] for b in batches]


# ---- sample shards --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["video", "multiview"])
def test_shards_readable_and_match_manifest(shards, kind):
    root, manifest = shards
    entry = manifest["kinds"][kind]
    assert json.loads((root / kind / "manifest.json").read_text())["counts"] == entry["counts"]
    layout = GridLayout(**entry["layout"])
    for split in ("train", "val"):
        paths = sorted((root / kind).glob(f"{split}-*.tar"))
        assert [p.name for p in paths] == entry["shards"][split]
        # plain tarfile: every sample has exactly png / json / txt
        with tarfile.open(paths[0]) as tar:
            names = [m.name for m in tar.getmembers()]
        assert {n.split(".", 1)[1] for n in names} == {"png", "json", "txt"}
        assert sum(len(_tar_keys(p)) for p in paths) == entry["counts"][split]
        assert count_samples(str(p) for p in paths) == entry["counts"][split]

        # plain webdataset, no gridgen code involved
        dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode("rgb8")
        samples = list(dataset)
        assert len(samples) == entry["counts"][split]
        for s in samples:
            assert s["png"].shape == (*SIZES[kind], 3) and s["png"].dtype == np.uint8
            meta = s["json"]
            assert (meta["rows"], meta["cols"], meta["cell_height"], meta["cell_width"]) == (
                layout.rows,
                layout.cols,
                32,
                32,
            )
            assert meta["kind"] == kind and meta["source"] == "gridgen-sample"
            assert meta["source_id"] == s["__key__"]
            first = meta["frame_indices"][0]  # video: 16 consecutive frames of a 20-frame mp4, seeded start
            assert meta["frame_indices"] == list(range(first, first + layout.num_cells))
            assert (0 <= first <= 4) if kind == "video" else first == 0
            assert ("fps" in meta) == (kind == "video") and ("cameras" in meta) == (kind == "multiview")
            # c_layout: "A 16-frame sequence ..." (video) and paper Table 4's "A 24-frame sequence ..." (multi-view)
            assert meta["c_layout"] == layout.caption_prefix("video")
            if kind == "multiview":
                subject = f"{meta['metadata']['color']} {meta['metadata']['object']}"
                assert meta["c_content"].startswith("Each frame captures a 3D model of ")
                assert f" {subject} from a different angle, rotating 360 degrees." in meta["c_content"]
            assert s["txt"] == f"{meta['c_layout']} {meta['c_content']}"


def test_untile_recovers_moving_frames(shards):
    root, _ = shards
    for kind in ("video", "multiview"):
        dataset = wds.WebDataset(str(root / kind / "val-000000.tar"), shardshuffle=False).decode("torchrgb8")
        for s in dataset:
            layout = GridLayout(**{k: s["json"][k] for k in ("rows", "cols", "cell_height", "cell_width")})
            frames = layout.untile(s["png"])  # (F, 3, 32, 32)
            assert frames.shape == (layout.num_cells, 3, 32, 32)
            assert torch.equal(layout.tile(frames), s["png"])
            # consecutive frames differ: the shape moves / the camera turns
            assert all(not torch.equal(frames[k], frames[k + 1]) for k in range(layout.num_cells - 1))
            if kind == "video":
                # the shape (pixels unlike the background) is in every frame and its centroid travels
                background = torch.tensor(BACKGROUND_COLORS[s["json"]["metadata"]["background"]])
                mask = (frames.int() - background[None, :, None, None]).abs().sum(1) > 30
                area = mask.sum((1, 2)).float()
                assert (area > 0).all()
                ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
                centroid = torch.stack([(mask * xs).sum((1, 2)), (mask * ys).sum((1, 2))], 1) / area[:, None]
                assert (centroid[1:] - centroid[:-1]).norm(dim=1).sum() > 10  # pixels travelled


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    tiny = dict(num_video=3, num_multiview=2, num_val=1, samples_per_shard=2)

    def snapshot(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    write_sample_shards(tmp_path / "a", seed=0, **tiny)
    write_sample_shards(tmp_path / "b", seed=0, **tiny)
    write_sample_shards(tmp_path / "c", seed=1, **tiny)
    a, b, c = snapshot(tmp_path / "a"), snapshot(tmp_path / "b"), snapshot(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert a["video/train-000000.tar"] != c["video/train-000000.tar"]
    assert a["multiview/train-000000.tar"] != c["multiview/train-000000.tar"]


def test_ensure_sample_shards_caches_and_is_atomic(tmp_path, monkeypatch):
    # a crash half way leaves nothing behind, not even the temp folder
    def crash(out_dir, **kw):
        (Path(out_dir) / "video").mkdir(parents=True)
        (Path(out_dir) / "video" / "train-000000.tar").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_mod, "write_sample_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_sample_shards(tmp_path, seed=0)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    monkeypatch.setenv("GRIDGEN_CACHE", str(tmp_path))
    path = ensure_sample_shards(seed=0)  # default root from $GRIDGEN_CACHE, default sizes
    assert path == tmp_path / "sample-v2-seed0"
    assert [p.name for p in tmp_path.iterdir()] == ["sample-v2-seed0"]  # no temp folder left
    counts = {k: v["counts"] for k, v in json.loads((path / "manifest.json").read_text())["kinds"].items()}
    assert counts == {"video": {"train": 64, "val": 4}, "multiview": {"train": 32, "val": 4}}
    assert len(list((path / "video").glob("train-*.tar"))) == 4
    stamp = (path / "manifest.json").stat().st_mtime_ns
    assert ensure_sample_shards(tmp_path, seed=0) == path  # cached: not rewritten
    assert (path / "manifest.json").stat().st_mtime_ns == stamp


# ---- shard specs ----------------------------------------------------------------------------------


def test_resolve_shards_specs_and_errors(shards, tmp_path):
    root, _ = shards
    video = root / "video"
    folder = resolve_shards(video, "train")
    assert folder == [str(video / f"train-{i:06d}.tar") for i in range(4)]
    assert resolve_shards(f"{video}/train-{{000000..000003}}.tar") == folder
    assert resolve_shards(str(video / "train-*.tar")) == folder
    both = resolve_shards([video, root / "multiview"], "train")
    assert len(both) == 6 and both[:4] == folder
    assert len(resolve_shards(root, "val")) == 2  # a folder of folders: its subfolders' shards
    assert resolve_shards("pipe:cat /x/train-{0..1}.tar", allow_pipe=True) == [
        "pipe:cat /x/train-0.tar",
        "pipe:cat /x/train-1.tar",
    ]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no shards matching 'train-\*\.tar' in '.*empty'") as info:
        resolve_shards(empty, "train")
    message = str(info.value)
    assert "\n" not in message and "make prepare" in message and "data.train_shards" in message
    with pytest.raises(FileNotFoundError, match="missing.*does not exist"):
        resolve_shards(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="train-000009.tar"):
        resolve_shards(f"{video}/train-{{000000..000009}}.tar")
    # pipe: runs a shell command: refused without the opt-in, one line naming the key
    with pytest.raises(ValueError) as info:
        resolve_shards([video, "pipe:cat /x/train-0.tar"], name="sources.webvid.shards")
    assert str(info.value) == ("data.sources.webvid.shards 'pipe:cat /x/train-0.tar' runs a shell command (pipe:); "
                               "set data.allow_pipe=true to allow pipe: shards (only for commands you trust), or give "
                               "a folder, pattern or URL")


def test_datamodule_empty_folder_error(tmp_path):
    (tmp_path / "empty").mkdir()
    dm = GridDataModule(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no shards matching 'train-.*make prepare"):
        dm.train_dataloader()
    dm = GridDataModule(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dm.setup("fit")


# ---- training stream ------------------------------------------------------------------------------


def test_train_batches_format_and_never_mixed(shards):
    root, _ = shards
    dm = GridDataModule([root / "video", root / "multiview"], batch_size=3, seed=0, shuffle_buffer=16)
    loader = dm.train_dataloader()
    assert dm.batches_per_epoch == (16 + 8) // 3 == len(loader)
    seen = set()
    for _ in range(2):
        batches = _epoch(loader)
        assert len(batches) == dm.batches_per_epoch  # a fixed number of batches per epoch
        for batch in batches:
            assert set(batch) == {"pixel_values", "caption", "layout", "__key__"}
            layout = GridLayout(**batch["layout"])
            pixels = batch["pixel_values"]
            assert pixels.dtype == torch.float32 and pixels.shape == (3, 3, layout.height, layout.width)
            assert pixels.min() >= -1.0 and pixels.max() <= 1.0 and pixels.min() < 0 < pixels.max()
            kinds = {key.split("-")[0] for key in batch["__key__"]}
            assert len(kinds) == 1  # never a mixed batch
            kind = kinds.pop()
            assert (layout.rows, layout.cols) == {"video": (4, 4), "multiview": (4, 6)}[kind]
            assert all(c.startswith(layout.caption_prefix("video")) for c in batch["caption"])  # "N-frame", Table 4
            assert all(("3D model of" in c) == (kind == "multiview") for c in batch["caption"])
            seen.add(layout.name)
    assert seen == {"4x4", "4x6"}
    assert dm.num_skipped == 0

    dm = GridDataModule(root / "video", batch_size=2, samples_per_epoch=10)
    assert len(_epoch(dm.train_dataloader())) == 5


def test_train_stream_is_deterministic(shards):
    root, _ = shards

    def first_two_epochs(seed: int) -> list[list[str]]:
        loader = GridDataModule(root, batch_size=2, seed=seed, shuffle_buffer=8).train_dataloader()
        return _keys(_epoch(loader)) + _keys(_epoch(loader))

    run = first_two_epochs(0)
    assert run == first_two_epochs(0)
    assert run[: len(run) // 2] != run[len(run) // 2 :]  # the next epoch draws other shards
    assert run != first_two_epochs(1)


def test_ranks_step_in_lockstep(shards, monkeypatch):
    """Two DDP ranks (simulated): same number of batches each, different data."""
    root, _ = shards
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = GridDataModule(root / "video", batch_size=2, shuffle_buffer=4)
        dm.trainer = SimpleNamespace(world_size=2)
        per_rank.append(_keys(_epoch(dm.train_dataloader())))
    assert len(per_rank[0]) == len(per_rank[1]) == 16 // (2 * 2)
    assert per_rank[0] != per_rank[1]


# ---- validation -----------------------------------------------------------------------------------


def test_validation_is_fixed_and_complete(shards):
    root, _ = shards
    dm = GridDataModule(root / "video", val_shards=[root / "video", root / "multiview"], batch_size=2)
    loader = dm.val_dataloader()
    first, second = _epoch(loader), _epoch(loader)
    assert _keys(first) == _keys(second)
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, second, strict=True))
    # every val sample exactly once, in shard order; last batch of each layout partial (3 = 2 + 1)
    assert _keys(first) == [
        ["video-val-000000", "video-val-000001"],
        ["multiview-val-000000", "multiview-val-000001"],
        ["video-val-000002"],
        ["multiview-val-000002"],
    ]
    for batch in first:
        layout = GridLayout(**batch["layout"])
        assert batch["pixel_values"].shape[1:] == (3, layout.height, layout.width)
    assert GridDataModule(root).val_dataloader() == []  # no val_shards: no validation


# ---- broken data and cached tensors ---------------------------------------------------------------


def _write(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), mtime=0) as sink:
        for s in samples:
            sink.write(s)


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
    _write(tmp_path / "val-000000.tar", good[:2] + [truncated] + good[2:] + [no_layout])
    _write(tmp_path / "train-000000.tar", good[:2] + [truncated] + good[2:] + [no_layout])

    dm = GridDataModule(tmp_path, val_shards=tmp_path, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="gridgen.data"):
        batches = _epoch(dm.val_dataloader())
        assert not caplog.records  # no line per broken sample
        dm.log_skips()
    assert sorted(sum(_keys(batches), [])) == sorted(s["__key__"] for s in good)
    assert dm.num_skipped == 2
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("data: skipped 2 broken samples: undecodable_member=1 (e.g. sample 'truncated-png': member "
                           "'png' cannot be decoded"), line
    assert "bad_layout=1 (e.g. sample 'no-layout': sample json has no 'rows'/'cols'" in line and line.endswith("2 in all")

    # training goes on too (the resampled stream meets the broken samples again and again)
    train = _epoch(dm.train_dataloader())
    assert len(train) == dm.batches_per_epoch == 6 // 2  # count_samples counts the broken keys too
    assert dm.num_skipped > 2


def test_skip_count_is_shared_with_workers(shards, tmp_path):
    root, _ = shards
    good = _raw_samples(root / "video" / "train-000001.tar")
    broken = dict(good[0], __key__="broken", png=b"\x89PNG not really")
    _write(tmp_path / "val-000000.tar", good[:2] + [broken])
    _write(tmp_path / "val-000001.tar", good[2:] + [dict(broken, __key__="broken2")])
    dm = GridDataModule(root / "video", val_shards=tmp_path, batch_size=2, num_workers=2)
    keys = sorted(sum(_keys(_epoch(dm.val_dataloader())), []))
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
    _write(tmp_path / "val-000000.tar", samples)
    dm = GridDataModule(tmp_path, val_shards=tmp_path, batch_size=3, cached=True)
    (batch,) = _epoch(dm.val_dataloader())
    assert batch["latents.npy"].shape == (3, 16, 16, 16)
    assert batch["latents.npy"][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert batch["pixel_values"].shape == (3, 3, 128, 128)

    # latents only (no image): layout from the json, no pixel_values
    _write(tmp_path / "val-000000.tar", [{k: v for k, v in s.items() if k != "png"} for s in samples])
    (batch,) = _epoch(dm.val_dataloader())
    assert "pixel_values" not in batch and batch["layout"]["rows"] == 4
    assert batch["latents.npy"].shape == (3, 16, 16, 16)


# ---- with Lightning -------------------------------------------------------------------------------


class _CountingModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_steps: list[int] = []
        self.val_keys: list[str] = []

    def training_step(self, batch, batch_idx):
        self.train_steps.append(self.current_epoch)
        return (batch["pixel_values"].mean() - self.weight) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_keys.extend(batch["__key__"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_uses_fixed_epochs(shards):
    root, _ = shards
    dm = GridDataModule([root / "video", root / "multiview"], val_shards=root, batch_size=4)
    model = _CountingModule()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert model.train_steps == [0] * 6 + [1] * 6  # (16 + 8) // 4 batches per epoch
    assert sorted(model.val_keys) == sorted(
        [f"{k}-val-{i:06d}" for k in ("video", "multiview") for i in range(3)] * 2
    )
