"""Shard specs (folders, brace patterns, globs, pipe: behind its opt-in), sample counts from manifests or tar
headers, and shards that cannot be read, refused in setup() in one line."""

from __future__ import annotations

import tarfile

import pytest
import torch

from gridgen.data import GridDataModule, resolve_shards
from tests.helpers.shards import kind_of, setup_error, train_batches, write_shard


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


def test_pipe_cat_source_streams_like_the_file(root):
    shards = sorted((root / "video").glob("train-*.tar"))
    local = GridDataModule([str(p) for p in shards], batch_size=2, shuffle_buffer=4, seed=3)
    piped = GridDataModule([f"pipe:cat {p}" for p in shards], batch_size=2, shuffle_buffer=4, seed=3,
                           samples_per_epoch=16, allow_pipe=True)
    got = train_batches(piped)
    expected = train_batches(local)
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
    kinds = {kind_of(k) for b in train_batches(mixed) for k in b["__key__"]}
    assert kinds == {"video", "multiview"}
    val = [k for b in mixed.val_dataloader() for k in b["__key__"]]
    assert val == [f"video-val-{i:06d}" for i in range(3)]


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


def test_a_file_that_is_not_a_tar_fails_in_setup(video_samples, tmp_path):
    (tmp_path / "train-000000.tar").write_text("not a tar file\n")
    message = setup_error(GridDataModule(tmp_path))
    assert message.startswith(f"shard '{tmp_path / 'train-000000.tar'}' is not a readable tar file")
    assert message.endswith("re-create it with `make prepare` (or `make cache`) or remove it from data.train_shards")

    with tarfile.open(tmp_path / "train-000000.tar", "w"):
        pass  # a valid, empty tar
    assert setup_error(GridDataModule(tmp_path)).startswith(
        f"shard '{tmp_path / 'train-000000.tar'}' holds no samples;")

    # validation shards are checked too, and named as such
    write_shard(tmp_path / "good" / "train-000000.tar", video_samples)
    (tmp_path / "good" / "val-000000.tar").write_bytes(b"\x00" * 10)
    message = setup_error(GridDataModule(tmp_path / "good", val_shards=tmp_path / "good"))
    assert "val-000000.tar' is not a readable tar file" in message and "data.val_shards" in message
