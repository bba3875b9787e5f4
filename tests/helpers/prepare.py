"""`make prepare` inputs and outputs: the prepare config composed as a command line would, a WebVid-style raw
folder, the shards' samples and bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import webdataset as wds
from hydra import compose, initialize_config_dir

from gridgen.config import CONF_DIR
from gridgen.data.cards import register_card_resolver
from gridgen.data.sources import write_video
from gridgen.embedded.world import moving_shape_clip

register_card_resolver()  # ${gridgen_card:...} in conf/prepare/data/, as the entry point registers it


def compose_prepare(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR / "prepare"), version_base="1.3"):
        return compose("prepare", overrides=list(overrides))


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def read_samples(folder: Path, split: str = "train", decode: str | None = "rgb8") -> list[dict]:
    dataset = wds.WebDataset([str(p) for p in sorted(folder.glob(f"{split}-*.tar"))], shardshuffle=False)
    return list(dataset.decode(decode) if decode else dataset)


def write_webvid(folder: Path, n_good: int = 4, frames: int = 20) -> Path:
    """A WebVid-style raw folder: `<page_dir>/<videoid>.mp4` + results.csv, with one of each bad input."""
    (folder / "pd").mkdir(parents=True)
    rows = []
    for i in range(n_good):
        clip, meta = moving_shape_clip(np.random.default_rng(i), frames, 48, 64)
        write_video(folder / "pd" / f"{1000 + i}.mp4", clip, fps=8)
        rows.append((str(1000 + i), meta["name"]))
    write_video(folder / "pd" / "2000.mp4", moving_shape_clip(np.random.default_rng(9), 5, 48, 64)[0], fps=8)
    (folder / "pd" / "2001.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    write_video(folder / "pd" / "2003.mp4", moving_shape_clip(np.random.default_rng(8), frames, 48, 64)[0], fps=8)
    rows += [("2000", "too short"), ("2001", "corrupt"), ("2002", "never downloaded"), ("2003", ""),
             ("1000", "a duplicate row")]
    lines = ["videoid,contentUrl,duration,page_dir,name"]
    lines += [f'{vid},http://x/{vid}.mp4,PT00H00M02S,pd,"{name}"' for vid, name in rows]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")
    return folder / "results.csv"


def sample_set(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a folder's train shards: key -> {member: bytes}, whatever shard it sits in."""
    samples = {}
    for s in read_samples(folder, decode=None):
        assert s["__key__"] not in samples, f"{s['__key__']} twice"
        samples[s["__key__"]] = {k: v for k, v in s.items() if not k.startswith("__")}
    return samples
