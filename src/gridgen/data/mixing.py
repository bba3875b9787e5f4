"""Weighted training sources, their seeded sample-by-sample mix, and where a resumed run continues.

Several sources (coarse t2v: WebVid + TikTok) are streamed side by side and mixed sample by sample with
webdataset's own ``RandomMix`` in proportion to their weights (:class:`SeededRandomMix` only makes it
reproducible); each source resamples its own shards. Resampling and mixing count epochs, so a resumed run
restores those counters and skips the batches of the current epoch it already trained on
(:func:`resume_position`, :class:`SkipFirst`): it sees the batches an uninterrupted run would.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import webdataset as wds

from gridgen.data.shardlists import ShardSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One stream of the training mix: its shards and its share of the samples (weights need not sum to 1)."""

    name: str
    shards: ShardSpec
    weight: float = 1.0
    config_key: str = "train_shards"  # where the user sets it, for error messages


def _weight(value: Any, key: str) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{key} must be a number >= 0, got {value!r}")
    return weight


def parse_sources(
    train_shards: ShardSpec | None = None,
    sources: Mapping[str, Any] | None = None,
    weights: Sequence[float] | None = None,
) -> list[Source]:
    """The training sources of a data config, with their weights.

    * ``train_shards`` alone: one source (a list of specs is concatenated into it).
    * ``train_shards`` as a list + ``weights``: one source per list entry, one weight each.
    * ``sources``: ``{name: {shards: spec, weight: w}}`` (or ``{name: spec}``, weight 1), named so that
      ``data.sources.tiktok.weight=0.5`` reads as what it does. A weight of 0 drops the source.

    Bad combinations raise one line naming the keys and the fix.
    """
    if sources and train_shards is not None:
        raise ValueError(
            f"data.train_shards and data.sources are both set (sources: {', '.join(map(str, sources))}); "
            "set data.train_shards=null to stream the weighted sources, or use a single-source data config (data=shards)"
        )
    if sources:
        if weights is not None:
            raise ValueError("data.weights weighs the entries of a data.train_shards list; with data.sources give each "
                             "source its own weight (data.sources.<name>.weight=...)")
        parsed = []
        for name, entry in sources.items():
            key = f"data.sources.{name}"
            if entry is None:
                continue  # removed by an override (data.sources.tiktok=null)
            if isinstance(entry, Mapping):
                unknown = set(entry) - {"shards", "weight"}
                if unknown:
                    raise ValueError(f"{key} has unknown keys {sorted(unknown)}; a source has `shards` and `weight`")
                if entry.get("shards") in (None, ""):
                    raise ValueError(f"{key}.shards is not set; point it at the source's shards (a folder, brace "
                                     "pattern, pipe: command or URL)")
                parsed.append(Source(str(name), entry["shards"], _weight(entry.get("weight", 1.0), f"{key}.weight"),
                                     f"sources.{name}.shards"))
            else:
                parsed.append(Source(str(name), entry, 1.0, f"sources.{name}"))
    elif train_shards is not None:
        if weights is None:
            parsed = [Source("train", train_shards)]
        else:
            specs = [train_shards] if isinstance(train_shards, str | os.PathLike) else list(train_shards)
            values = list(weights) if isinstance(weights, Sequence) and not isinstance(weights, str) else [weights]
            if len(values) != len(specs):
                raise ValueError(
                    f"data.weights has {len(values)} value(s) for {len(specs)} data.train_shards entr"
                    f"{'y' if len(specs) == 1 else 'ies'}; give one weight per shard spec, e.g. "
                    f"data.weights=[{','.join(['1'] * len(specs))}]"
                )
            parsed = [Source(f"train_shards[{i}]", spec, _weight(w, f"data.weights[{i}]"), f"train_shards[{i}]")
                      for i, (spec, w) in enumerate(zip(specs, values, strict=True))]
    else:
        raise ValueError("no training data: set data.train_shards=<shards> or data.sources.<name>.shards=<shards> "
                         "(see conf/data/)")
    if not parsed:
        raise ValueError("data.sources is empty; give at least one source with shards and a weight > 0")
    active = [src for src in parsed if src.weight > 0]
    if not active:
        raise ValueError(f"every training source has weight 0 ({', '.join(s.name for s in parsed)}); give at least "
                         "one a weight > 0")
    for src in parsed:
        if src.weight == 0:
            log.info("source %s has weight 0: not streamed", src.name)
    return active


class SeededRandomMix(wds.RandomMix):
    """webdataset's ``RandomMix`` (each sample from source ``i`` with probability ``w_i / sum(w)``), reproducible.

    ``RandomMix`` draws from Python's global ``random``; this runs it on a private generator seeded from
    (seed, rank, worker, epoch), swapped in around each draw, so the same seed gives the same mix and the
    caller's global random state is left alone.
    """

    def __init__(self, datasets: list[Any], probs: list[float], seed: int = 0) -> None:
        super().__init__(datasets, probs=probs, longest=False)
        self.seed = seed
        self.epoch = -1  # like ResampledShards: a new draw every epoch (persistent workers keep the counter)

    def __iter__(self) -> Iterator[Any]:
        self.epoch += 1
        rng = random.Random(wds.utils.make_seed(wds.utils.pytorch_worker_seed(), self.epoch, self.seed))
        mixed = super().__iter__()
        while True:
            outer = random.getstate()
            random.setstate(rng.getstate())
            try:
                sample = next(mixed)
            except StopIteration:
                return
            finally:
                rng.setstate(random.getstate())
                random.setstate(outer)
            yield sample


def resume_position(trainer: Any, batches_per_epoch: int) -> tuple[int, int]:
    """``(epoch, batches of it already trained on)`` of a restored trainer; ``(0, 0)`` for a fresh run.

    The resampling and mixing epoch counters start at that epoch, and the loader skips that many batches.
    """
    if trainer is None or getattr(trainer, "global_step", 0) <= 0:
        return 0, 0
    epoch = trainer.current_epoch
    consumed = trainer.global_step * trainer.accumulate_grad_batches
    return epoch, max(0, consumed - epoch * batches_per_epoch)


class SkipFirst:
    """A loader whose first iteration skips ``skip`` batches (the part of an epoch trained before a resume).

    Lightning asks a loader for ``state_dict``/``load_state_dict`` to resume mid-epoch (and warns that the run is
    "not resumable" without them). The position needs no state of its own: it is a function of the trainer's
    restored step and epoch (:func:`resume_position`), which the DataModule reads when it builds this loader.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # see the class docstring: resume_position() already placed this loader

    def __init__(self, loader: Any, skip: int) -> None:
        self.loader, self.skip = loader, skip

    def __len__(self) -> int:
        # the full epoch: Lightning restores how many batches of it ran and counts on from there
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            next(iterator, None)
        yield from iterator
