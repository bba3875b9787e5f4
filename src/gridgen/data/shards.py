"""Resumable WebDataset shard writing: ``{split}-000000.tar ...`` plus a ``manifest.json`` that records them.

Samples are written in a fixed order through ``webdataset.ShardWriter`` (``maxcount`` samples or ``maxsize``
bytes per shard, whichever comes first; a shard may pass ``maxsize`` by its last sample). A shard is written
under ``.tmp-{split}/`` and renamed into place when it is closed, then the manifest (replaced atomically)
records it with the *cursor* after its last sample, ``(input index, grid index within that input)``, and the
counters of the inputs finished before that cursor. So the folder never holds a partial shard, and a run
that stops anywhere (Ctrl-C, a crash, a killed job) resumes at the cursor of its last finished shard: the
inputs after it are processed again (deterministically, from the seed), nothing is lost and nothing is
written twice.

The manifest is readable by people and the datamodule alike::

    {"format": "gridgen-shards/1", "name": ..., "kind": ..., "layout": {...},
     "counts": {"train": 1234}, "shards": {"train": ["train-000000.tar", ...]},
     "splits": {"train": {"complete": true, "counts": {"inputs_done": ..., "samples": ..., "skipped": {...},
                                                       "adjusted": {...}}, "ignored_files": {...}, ...}}}

``skipped`` counts inputs that gave no grid by reason, ``adjusted`` inputs written after a change (e.g.
``resized_mismatched``), ``ignored_files`` the files under ``prepare.src`` that were not inputs at all.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "gridgen-shards/1"
TAR_MTIME = 0.0  # fixed member mtime: the same inputs and seed give byte-identical shards
MAX_EXAMPLES = 3  # skip details kept per reason


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def empty_counts() -> dict[str, Any]:
    return {"inputs_done": 0, "samples": 0, "frames": 0, "skipped": {}, "adjusted": {}, "examples": {}}


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Serialise manifest read-modify-write between prepare runs sharing a folder (train and val at once)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, one run per folder
        yield
        return
    with open(out / ".manifest.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_manifest(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _with_totals(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's per-split summaries (``counts``, ``shards``) recomputed from its ``splits``."""
    splits = manifest.setdefault("splits", {})
    manifest["counts"] = {name: s["counts"]["samples"] for name, s in splits.items()}
    manifest["shards"] = {name: [x["name"] for x in s["shards"]] for name, s in splits.items()}
    return manifest


class ResumableShardWriter:
    """Writes one split of a dataset into ``out``; see the module docstring for the guarantees.

    Usage: ``writer.cursor`` says where to resume; for every input from there call :meth:`write` for each
    of its samples (with its grid index), then :meth:`input_done`; finally :meth:`close`.
    """

    def __init__(self, out: str | Path, split: str, *, header: dict[str, Any], config_hash: str,
                 inputs: int, inputs_hash: str, maxcount: int = 1000, maxsize: float = 1e9,
                 overwrite: bool = False) -> None:
        if not isinstance(maxcount, int) or maxcount < 1:
            raise ValueError(f"data.shards.maxcount must be a positive integer, got {maxcount!r}")
        if not float(maxsize) > 0:
            raise ValueError(f"data.shards.maxsize must be a positive number of bytes, got {maxsize!r}")
        self.out = Path(out).expanduser()
        self.split = split
        self.maxcount, self.maxsize = maxcount, float(maxsize)
        self.tmp = self.out / f".tmp-{split}"
        # what this run found, so that a run that makes nothing can put the folder back as it was (discard)
        self._made_out = not self.out.exists()
        self._had_lock = (self.out / ".manifest.lock").exists()
        self.out.mkdir(parents=True, exist_ok=True)
        with _locked(self.out):
            manifest = read_manifest(self.out)
            self._had_manifest = manifest is not None
            entry = (manifest or {}).get("splits", {}).get(split)
            self._entry_before = copy.deepcopy(entry)
            if entry and overwrite:
                entry = None
            elif entry and (entry["config_hash"], entry["inputs_hash"]) != (config_hash, inputs_hash):
                what = "config" if entry["config_hash"] != config_hash else "list of inputs"
                present = [s["name"] for s in entry["shards"] if (self.out / s["name"]).is_file()]
                if present:
                    raise ValueError(
                        f"'{self.out}' already holds {len(present)} {split} shards made with another {what} "
                        f"({present[0]} ...); resume needs the same settings and inputs: choose another prepare.out, "
                        "or prepare.overwrite=true to replace them")
                log.info("%s: the earlier %s run with another %s left no shard; starting afresh", self.out, split,
                         what)
                entry = None
            if manifest is None:
                strays = sorted(self.out.glob(f"{split}-*.tar"))
                if strays and not overwrite:
                    raise ValueError(f"'{self.out}' holds {split} shards ({strays[0].name} ...) without a gridgen "
                                     "manifest.json; choose an empty prepare.out or prepare.overwrite=true")
            self.entry: dict[str, Any] = entry or {
                "complete": False, "config_hash": config_hash, "inputs": inputs, "inputs_hash": inputs_hash,
                "counts": empty_counts(), "shards": [],
            }
            keep = {s["name"] for s in self.entry["shards"]}
            # shards renamed but not yet recorded by a stopped run, or of a replaced run: not ours to keep
            for path in self.out.glob(f"{split}-*.tar"):
                if path.name not in keep:
                    path.unlink()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._header = header
            self._save(manifest)
        last = self.entry["shards"][-1] if self.entry["shards"] else None
        self.cursor: tuple[int, int] = tuple(last["end"]) if last else (0, 0)  # type: ignore[assignment]
        self.counts: dict[str, Any] = copy.deepcopy(last["counts"]) if last else empty_counts()
        self._sink: wds.ShardWriter | None = None
        self._position = self.cursor
        self._in_shard = 0

    @property
    def complete(self) -> bool:
        return bool(self.entry["complete"])

    # ---- manifest -------------------------------------------------------------------------------
    def _save(self, manifest: dict[str, Any] | None = None) -> None:
        """Merge this split into ``manifest.json`` (caller holds the lock)."""
        manifest = manifest if manifest is not None else (read_manifest(self.out) or {})
        manifest.update({"format": FORMAT, **self._header})
        manifest.setdefault("splits", {})[self.split] = self.entry
        write_json_atomic(self.out / MANIFEST, _with_totals(manifest))

    def _finished(self, tmp_name: str) -> None:
        """ShardWriter's ``post`` hook: a shard was closed; publish it and record the cursor after it."""
        path = Path(tmp_name)
        if self._in_shard == 0:  # ShardWriter opens a stream before the first write; nothing was written
            path.unlink(missing_ok=True)
            return
        final = self.out / path.name
        os.replace(path, final)
        record = {"name": final.name, "samples": self._in_shard, "bytes": final.stat().st_size,
                  "end": list(self._position), "counts": copy.deepcopy(self.counts)}
        self.entry["shards"].append(record)
        self.entry["counts"] = copy.deepcopy(self.counts)
        self._in_shard = 0
        with _locked(self.out):
            self._save()
        log.debug("finished %s (%d samples)", final.name, record["samples"])

    # ---- writing --------------------------------------------------------------------------------
    def write(self, sample: dict[str, Any], input_index: int, grid_index: int) -> None:
        if self._sink is None:
            self.tmp.mkdir(parents=True, exist_ok=True)
            self._sink = wds.ShardWriter(str(self.tmp / f"{self.split}-%06d.tar"), maxcount=self.maxcount,
                                         maxsize=self.maxsize, post=self._finished,
                                         start_shard=len(self.entry["shards"]), verbose=0, mtime=TAR_MTIME)
        self._position = (input_index, grid_index)  # if this write starts a new shard, the old one ends here
        self._sink.write(sample)
        self._in_shard += 1

    def input_done(self, input_index: int, samples: int = 0, frames: int = 0,
                   skipped: str | None = None, detail: str = "", adjusted: str | None = None) -> None:
        """Count a finished input (all of its samples written, or skipped for ``skipped``; ``adjusted``: written
        after a change such as ``resized_mismatched``)."""
        counts = self.counts
        counts["inputs_done"] += 1
        counts["samples"] += samples
        counts["frames"] += frames
        for group, reason in (("skipped", skipped), ("adjusted", adjusted)):
            if reason:
                tally = counts.setdefault(group, {})  # manifests of older runs have no "adjusted"
                tally[reason] = tally.get(reason, 0) + 1
                examples = counts["examples"].setdefault(reason, [])
                if len(examples) < MAX_EXAMPLES:
                    examples.append(detail[:300])
        self._position = (input_index + 1, 0)

    def add_skips(self, reason: str, count: int) -> None:
        """Inputs dropped while listing (e.g. duplicate ids), counted once per run from the start."""
        if count and self.cursor == (0, 0):
            self.counts["skipped"][reason] = self.counts["skipped"].get(reason, 0) + count

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Finish the last shard and mark the split complete; returns the split's manifest entry."""
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.entry["counts"] = copy.deepcopy(self.counts)
        self.entry["complete"] = True
        self.entry.update(extra or {})
        with _locked(self.out):
            self._save()
        return self.entry

    def discard(self) -> None:
        """Undo a run that wrote no shard (it produced no sample): this split's record goes back to what it was
        before the run, and a manifest, lock file or folder that the run created is removed, so the failed
        command leaves the folder as it found it."""
        self.abort()
        if self.entry["shards"]:
            raise RuntimeError("discard() is for runs that wrote no shard")
        with _locked(self.out):
            manifest = read_manifest(self.out) or {}
            splits = manifest.setdefault("splits", {})
            if self._entry_before is None:
                splits.pop(self.split, None)
            else:
                splits[self.split] = self._entry_before
            if splits or self._had_manifest:
                write_json_atomic(self.out / MANIFEST, _with_totals(manifest))
            else:
                (self.out / MANIFEST).unlink(missing_ok=True)
        if not self._had_lock:
            (self.out / ".manifest.lock").unlink(missing_ok=True)
        if self._made_out:
            with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile, keep it
                self.out.rmdir()

    def abort(self) -> None:
        """Drop the shard being written (no partial shard is ever published); finished ones stay."""
        if self._sink is not None and self._sink.tarstream is not None:
            self._sink.tarstream.close()
            self._sink.tarstream = None
        self._sink = None
        shutil.rmtree(self.tmp, ignore_errors=True)
