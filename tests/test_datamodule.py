"""Streaming at scale: weighted source mixing, pipe: sources, bad source configs, skipped counts in the logger."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import webdataset as wds
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger

from gridgen.data.datamodule import GridDataModule, parse_sources
from gridgen.embedded import write_sample_shards
from gridgen.layout import GridLayout
from tests.helpers.train import make_cfg

KINDS = {"video": (4, 4), "multiview": (4, 6)}



@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine OpenMP spin-waiting makes a 3-step tiny run take ~18 s
    instead of ~0.4 s. Both sides of every comparison here run with the same setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """video/: 16 train samples (4 shards of 4x4 grids); multiview/: 8 (2 shards of 4x6 grids); 3 val each."""
    out = tmp_path_factory.mktemp("shards")
    write_sample_shards(out, seed=0, num_video=16, num_multiview=8, num_val=3, samples_per_shard=4)
    return out


def _batches(dm: GridDataModule, count: int | None = None) -> list[dict]:
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if count is not None and len(batches) == count:
            break
    return batches


def _kind(key: str) -> str:
    return key.split("-")[0]


# ---- weighted mixing --------------------------------------------------------------------------------


def test_mix_follows_the_weights_not_the_sizes(root):
    """multiview has a third of the samples but weight 3:1: three quarters of the stream must be multiview."""
    sources = {"video": {"shards": str(root / "video"), "weight": 1.0},
               "multiview": {"shards": str(root / "multiview"), "weight": 3.0}}
    dm = GridDataModule(sources=sources, batch_size=2, samples_per_epoch=240, shuffle_buffer=8, seed=0)
    random.seed(1234)
    state = random.getstate()
    batches = _batches(dm)
    assert random.getstate() == state  # the mix draws from its own generator, not the caller's global one
    assert len(batches) == 120 == dm.batches_per_epoch
    counts = {"video": 0, "multiview": 0}
    for batch in batches:
        kinds = {_kind(k) for k in batch["__key__"]}
        assert len(kinds) == 1  # a batch never mixes grid shapes
        kind = kinds.pop()
        layout = GridLayout(**batch["layout"])
        assert (layout.rows, layout.cols) == KINDS[kind]
        assert batch["pixel_values"].shape == (2, 3, layout.height, layout.width)
        counts[kind] += 2
    share = counts["multiview"] / 240
    # binomial sd 0.028 around 0.75; the unweighted concatenation would give 8 / 24 = 0.33
    assert 0.63 < share < 0.87, counts


def test_mix_is_reproducible_and_seeded(root):
    def keys(seed: int) -> list[list[str]]:
        sources = {"video": {"shards": str(root / "video"), "weight": 1},
                   "multiview": {"shards": str(root / "multiview"), "weight": 1}}
        dm = GridDataModule(sources=sources, batch_size=2, samples_per_epoch=24, shuffle_buffer=4, seed=seed)
        loader = dm.train_dataloader()
        return [b["__key__"] for b in loader] + [b["__key__"] for b in loader]  # two epochs

    run = keys(0)
    assert run == keys(0)
    assert run != keys(1)
    assert run[:6] != run[6:]  # the second epoch draws anew


def test_weights_list_and_zero_weight(root):
    """``train_shards: [a, b]`` + ``weights``: one source per entry; weight 0 drops a source."""
    only_multiview = GridDataModule([root / "video", root / "multiview"], weights=[0, 1], batch_size=2,
                                    samples_per_epoch=16, shuffle_buffer=1)
    assert [s.name for s in only_multiview.sources] == ["train_shards[1]"]
    keys = [k for b in _batches(only_multiview) for k in b["__key__"]]
    assert len(keys) == 16 and {_kind(k) for k in keys} == {"multiview"}

    both = parse_sources([root / "video", root / "multiview"], weights=[2, 1])
    assert [(s.name, s.weight) for s in both] == [("train_shards[0]", 2.0), ("train_shards[1]", 1.0)]
    assert len(parse_sources([root / "video", root / "multiview"])) == 1  # no weights: one concatenated source


def test_video_mix_config_streams_both_sources(root, tmp_path):
    """`stage=coarse task=t2v data=video_mix`: WebVid + TikTok from the config, with the config's weights."""
    cfg = make_cfg(tmp_path, "stage=coarse", "task=t2v", "data=video_mix", f"data.sources.webvid.shards={root / 'video'}",
                   f"data.sources.tiktok.shards={root / 'multiview'}", "data.num_workers=0", "data.samples_per_epoch=8")
    assert cfg.data.train_shards is None
    dm = instantiate(cfg.data)
    weights = {s.name: s.weight for s in dm.sources}
    assert weights == {"webvid": cfg.data.sources.webvid.weight, "tiktok": cfg.data.sources.tiktok.weight}
    assert weights["webvid"] > weights["tiktok"] > 0
    dm.setup("fit")
    assert dm.source_urls == {"webvid": [str(root / "video" / f"train-{i:06d}.tar") for i in range(4)],
                              "tiktok": [str(root / "multiview" / f"train-{i:06d}.tar") for i in range(2)]}
    assert len(_batches(dm)) == 8 // cfg.data.batch_size


@pytest.mark.parametrize("kwargs, message", [
    (dict(train_shards=["a", "b"], weights=[1, 2, 3]),
     "data.weights has 3 value(s) for 2 data.train_shards entries; give one weight per shard spec, e.g. data.weights=[1,1]"),
    (dict(train_shards="a", sources={"webvid": {"shards": "b"}}), "data.train_shards and data.sources are both set"),
    (dict(sources={"webvid": {"shards": "a", "weight": 1}}, weights=[1]), "give each source its own weight"),
    (dict(sources={"tiktok": {"shards": "a", "weight": -1}}), "data.sources.tiktok.weight must be a number >= 0, got -1"),
    (dict(sources={"tiktok": {"shards": "a", "weight": "lots"}}), "data.sources.tiktok.weight must be a number"),
    (dict(train_shards=["a", "b"], weights=[0, 0]), "every training source has weight 0"),
    (dict(sources={"tiktok": {"shards": None, "weight": 1}}), "data.sources.tiktok.shards is not set"),
    (dict(sources={"tiktok": {"shard": "a"}}), "data.sources.tiktok has unknown keys ['shard']"),
    (dict(), "no training data: set data.train_shards"),
])
def test_bad_source_configs_are_one_line_errors(kwargs, message):
    dm = GridDataModule(**kwargs)  # Hydra's instantiate would wrap an error here: it comes in setup (trainer.fit)
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_weights_on_the_command_line(tmp_path):
    from tests.helpers.train import run_cli

    proc = run_cli("data=shards", f"data.train_shards=[{tmp_path},{tmp_path}]", "data.weights=[1]", "logger=none",
                   f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.train: error:")]
    assert errors == ["gridgen.train: error: data.weights has 1 value(s) for 2 data.train_shards entries; give one "
                      "weight per shard spec, e.g. data.weights=[1,1]"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/empty", "no shards matching 'train-*.tar' in '{tmp}/empty'; run `make prepare` or point "
                    "data.sources.tiktok.shards at a folder of WebDataset shards"),
    ("{tmp}/nowhere/train-{{000000..000002}}.tar", "3 shards of '{tmp}/nowhere/train-{{000000..000002}}.tar' do not exist"),
    ("{tmp}/empty/*.tar", "no shards matching '{tmp}/empty/*.tar'"),
])
def test_source_spec_matching_nothing(root, tmp_path, spec, message):
    (tmp_path / "empty").mkdir()
    dm = GridDataModule(sources={"webvid": {"shards": str(root / "video")},
                                 "tiktok": {"shards": spec.format(tmp=tmp_path), "weight": 0.5}})
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    assert message.format(tmp=tmp_path) in str(info.value) and "\n" not in str(info.value)


# ---- pipe: and URL sources ----------------------------------------------------------------------------


def test_pipe_cat_source_streams_like_the_file(root):
    shards = sorted((root / "video").glob("train-*.tar"))
    local = GridDataModule([str(p) for p in shards], batch_size=2, shuffle_buffer=4, seed=3)
    piped = GridDataModule([f"pipe:cat {p}" for p in shards], batch_size=2, shuffle_buffer=4, seed=3,
                           samples_per_epoch=16, allow_pipe=True)
    got = _batches(piped)
    expected = _batches(local)
    assert [b["__key__"] for b in got] == [b["__key__"] for b in expected] and len(got) == 8
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(got, expected, strict=True))
    assert piped.num_skipped == 0

    # a remote source cannot be counted: the epoch length must be given
    with pytest.raises(ValueError, match="cannot count the samples of remote shard 'pipe:cat .*set data.samples_per_epoch"):
        GridDataModule(f"pipe:cat {shards[0]}", allow_pipe=True).train_dataloader()
    # without the opt-in a pipe: spec is refused before anything runs
    with pytest.raises(ValueError, match=r"^data.train_shards 'pipe:cat .*set data.allow_pipe=true"):
        GridDataModule(f"pipe:cat {shards[0]}", samples_per_epoch=4).setup("fit")

    # mixed with a local source; and validation through pipe:
    mixed = GridDataModule(sources={"local": str(root / "multiview"), "piped": f"pipe:cat {shards[0]}"},
                           batch_size=2, samples_per_epoch=20, val_shards=f"pipe:cat {root / 'video' / 'val-000000.tar'}",
                           allow_pipe=True)
    kinds = {_kind(k) for b in _batches(mixed) for k in b["__key__"]}
    assert kinds == {"video", "multiview"}
    val = [k for b in mixed.val_dataloader() for k in b["__key__"]]
    assert val == [f"video-val-{i:06d}" for i in range(3)]


# ---- fixed validation ---------------------------------------------------------------------------------


def test_validation_is_the_same_on_every_rank(root, monkeypatch):
    """Three val shards of unequal sizes: both (simulated) ranks validate the same batches, in the same order."""
    val = [root / "video" / "val-000000.tar", root / "multiview" / "val-000000.tar"]
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = GridDataModule(root / "video", val_shards=[str(p) for p in val], batch_size=2)
        dm.trainer = SimpleNamespace(world_size=2)
        seen.append([b["__key__"] for b in dm.val_dataloader()])
    assert seen[0] == seen[1]
    assert sorted(k for b in seen[0] for k in b) == sorted(f"{k}-val-{i:06d}" for k in KINDS for i in range(3))


# ---- skipped samples in the logger ----------------------------------------------------------------------


class _TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        pixels = batch["pixel_values"]  # uint8 from the loader, float on the device (on_after_batch_transfer)
        assert pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1
        loss = (pixels.mean() - self.weight) ** 2
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def write_shard_with_two_broken_samples(root, folder):
    """The sample's first video shard with an unreadable PNG and a sample without a layout among its samples."""
    good = [{k: v for k, v in s.items() if k in ("__key__", "png", "json", "txt")}
            for s in wds.WebDataset(str(root / "video" / "train-000000.tar"), shardshuffle=False)]
    broken = [dict(good[0], __key__="broken-png", png=b"\x89PNG no"), dict(good[1], __key__="no-layout", json=b"{}")]
    with wds.TarWriter(str(folder / "train-000000.tar"), mtime=0) as sink:
        for sample in good[:2] + broken + good[2:]:
            sink.write(sample)


def test_skipped_samples_reach_the_lightning_logger(root, tmp_path):
    write_shard_with_two_broken_samples(root, tmp_path)
    dm = GridDataModule(tmp_path, batch_size=2, samples_per_epoch=12, shuffle_buffer=1)
    logger = CSVLogger(tmp_path / "logs", name="", version="v")
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_TinyModule(), datamodule=dm)
    with open(tmp_path / "logs" / "v" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("data/skipped")]
    logged = {int(r["step"]): float(r["data/skipped"]) for r in rows}
    assert sorted(logged) == list(range(6))  # every step (log_every_n_steps=1)
    values = [logged[s] for s in sorted(logged)]
    assert values == sorted(values) and values[-1] > 0  # a running count that saw the broken samples
    assert values[-1] <= dm.num_skipped and dm.num_skipped % 2 == 0  # both broken ones, every pass


def test_skips_are_one_console_line_per_logging_interval(root, tmp_path, caplog):
    """2 broken samples met again and again by the resampled stream: one line per log_every_n_steps with the counts
    per reason, not one per skip; the lines add up to every skip."""
    import logging
    import re

    write_shard_with_two_broken_samples(root, tmp_path)
    dm = GridDataModule(tmp_path, batch_size=2, samples_per_epoch=12, shuffle_buffer=1)
    trainer = L.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, log_every_n_steps=4,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.WARNING, logger="gridgen.data"):
        trainer.fit(_TinyModule(), datamodule=dm)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("gridgen.data")]
    assert dm.num_skipped >= 6 and 2 <= len(lines) <= 12 // 4 + 1  # steps 0, 4, 8 and the end of training
    counted = {"undecodable_member": 0, "bad_layout": 0}
    for line in lines:
        assert re.fullmatch(r"data \((up to step \d+|end of training)\): skipped \d+ broken samples: .*; \d+ in all",
                            line), line
        for reason, n in re.findall(r"(\w+)=(\d+)", line):
            counted[reason] += int(n)
    assert counted["undecodable_member"] == counted["bad_layout"] == dm.num_skipped // 2  # every pass meets both
    assert "(e.g. sample 'broken-png': member 'png' cannot be decoded" in lines[0]  # the first line of a reason


# ---- epoch length from manifests --------------------------------------------------------------------------


def test_epoch_length_read_from_the_prepare_manifest(root, tmp_path):
    """A folder's manifest.json lists its shards' sample counts: used instead of reading every tar header."""
    import json
    import shutil

    from gridgen.data.datamodule import count_samples

    folder = tmp_path / "video"
    shutil.copytree(root / "video", folder)
    urls = [str(folder / f"train-{i:06d}.tar") for i in range(4)]
    assert count_samples(urls) == 16
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["samples"] = 40  # the manifest, not the tar, is read
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert count_samples(urls) == 40 + 12
    (folder / "manifest.json").unlink()
    assert count_samples(urls) == 16  # no manifest: tar headers


# ---- uint8 hand-over ----------------------------------------------------------------------------------------


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


@pytest.mark.slow
def test_bench_data_quick_smoke():
    import re
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_data.py"
    proc = subprocess.run([sys.executable, str(bench), "--quick", "--no-write"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratios = [float(x) for x in re.findall(r"\*\*(?:ratio|speed-up|peak memory ratio) [^=*]+= ([0-9.]+)\*\*", proc.stdout)]
    assert len(ratios) == 3 and all(0 < r < 100 for r in ratios), proc.stdout


# ---- data configs and data cards ------------------------------------------------------------------------------


def test_data_configs_stream_where_the_cards_prepare(tmp_path, monkeypatch):
    """conf/data/<name>.yaml reads the folder that data_cards/<name>.md's prepare command writes."""
    import re

    from gridgen.data.cards import load_card

    monkeypatch.delenv("GRIDGEN_DATA", raising=False)

    def prepare_out(card: str) -> str:
        return re.search(r"prepare\.out=(\S+)", load_card(card)["prepare_command"])[1]

    for name in ("webvid", "tiktok", "objaverse"):
        assert make_cfg(tmp_path, f"data={name}").data.train_shards == prepare_out(name)
    mix = make_cfg(tmp_path, "data=video_mix").data
    assert {k: v.shards for k, v in mix.sources.items()} == {"webvid": prepare_out("webvid"),
                                                            "tiktok": prepare_out("tiktok")}
    monkeypatch.setenv("GRIDGEN_DATA", "/mnt/shards")
    assert make_cfg(tmp_path, "data=tiktok").data.train_shards == "/mnt/shards/tiktok-4x4"


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


def test_pin_memory_that_cannot_act_is_refused(root):
    dm = GridDataModule(root / "video", batch_size=2, samples_per_epoch=4, pin_memory=True)
    dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="data.pin_memory=true pins batches for copies to a CUDA device"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="data.image_decoder must be one of"):
        GridDataModule(root / "video", image_decoder="turbo")
