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
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

from gridgen.files import write_text_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "gridgen-shards/1"
TAR_MTIME = 0.0  # fixed member mtime: the same inputs and seed give byte-identical shards
MAX_EXAMPLES = 3  # skip details kept per reason
SINGLE_SHARD = re.compile(r"-\d{6}\.tar")  # {split}-000000.tar; a part's are {split}-p00003-000000.tar
PARTS_DIR = ".parts"  # {split}-p00003.json: the record of each part of a partitioned run, merged into the manifest


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
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
        self.tmp = self.out / f".tmp-{self.prefix}"
        self._header = header
        # what this run found, so that a run that makes nothing can put the folder back as it was (discard)
        self._made_out = not self.out.exists()
        self._had_lock = (self.out / ".manifest.lock").exists()
        self.out.mkdir(parents=True, exist_ok=True)
        with _locked(self.out):
            manifest = read_manifest(self.out)
            self._had_manifest = manifest is not None
            entry = self._load_entry(manifest)
            self._entry_before = copy.deepcopy(entry)
            if entry and overwrite:
                entry = None
            elif entry and (entry["config_hash"], entry["inputs_hash"]) != (config_hash, inputs_hash):
                what = "config" if entry["config_hash"] != config_hash else "list of inputs"
                present = [s["name"] for s in entry["shards"] if (self.out / s["name"]).is_file()]
                if present:
                    raise ValueError(
                        f"'{self.out}' already holds {len(present)} {self.what} shards made with another {what} "
                        f"({present[0]} ...); resume needs the same settings and inputs: choose another prepare.out, "
                        "or prepare.overwrite=true to replace them")
                log.info("%s: the earlier %s run with another %s left no shard; starting afresh", self.out, self.what,
                         what)
                entry = None
            self._check_neighbours(manifest, overwrite)
            self.entry: dict[str, Any] = entry or {
                "complete": False, "config_hash": config_hash, "inputs": inputs, "inputs_hash": inputs_hash,
                "counts": empty_counts(), "shards": [],
            }
            keep = {s["name"] for s in self.entry["shards"]}
            # shards renamed but not yet recorded by a stopped run, or of a replaced run: not ours to keep
            for path in self._own_shards():
                if path.name not in keep:
                    path.unlink()
            shutil.rmtree(self.tmp, ignore_errors=True)
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

    # ---- what differs between a whole split and a part of it (PartShardWriter) ---------------------
    prefix = property(lambda self: self.split)  # shard names: {prefix}-000000.tar ...
    what = property(lambda self: self.split)  # how messages name what this writer writes

    def _own_shards(self) -> list[Path]:
        return [p for p in self.out.glob(f"{self.split}-*.tar") if SINGLE_SHARD.fullmatch(p.name[len(self.split):])]

    def _load_entry(self, manifest: dict[str, Any] | None) -> dict[str, Any] | None:
        return (manifest or {}).get("splits", {}).get(self.split)

    def _check_neighbours(self, manifest: dict[str, Any] | None, overwrite: bool) -> None:
        """Refuse shards of this split that this run would not own or replace (caller holds the lock)."""
        strays = sorted(p.name for p in self._own_shards()) if manifest is None else []
        if strays and not overwrite:
            raise ValueError(f"'{self.out}' holds {self.split} shards ({strays[0]} ...) without a gridgen "
                             "manifest.json; choose an empty prepare.out or prepare.overwrite=true")
        parts = sorted(p.name for p in self.out.glob(f"{self.split}-p*-*.tar"))
        recorded = {s["name"] for s in ((manifest or {}).get("splits", {}).get(self.split) or {}).get("shards", [])}
        if parts and not overwrite and not set(parts) <= recorded:
            raise ValueError(f"'{self.out}' holds {self.split} shards of a partitioned run ({parts[0]} ...) that is "
                             "not merged; finish it (its parts, then prepare.merge=true), or prepare.overwrite=true "
                             "to replace it with this run")
        if overwrite:  # this run replaces the whole split: a partitioned run's shards and states go too
            for path in [*self.out.glob(f"{self.split}-p*-*.tar"), *part_states(self.out, self.split).values()]:
                path.unlink()

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
            self._sink = wds.ShardWriter(str(self.tmp / f"{self.prefix}-%06d.tar"), maxcount=self.maxcount,
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


# ---- partitioned runs: one writer per part, then one merge ---------------------------------------------


class PartsIncompleteError(ValueError):
    """A merge found a part of a partitioned run missing, failed or unfinished (a one-line user error)."""


def part_of(item_id: str, parts: int) -> int:
    """The part (``0 .. parts-1``) an input belongs to: a hash of its id, so the split does not depend on the
    order or number of the other inputs, and every input lands in exactly one part."""
    return int.from_bytes(hashlib.sha256(item_id.encode("utf-8")).digest()[:8], "big") % parts


def part_name(split: str, index: int) -> str:
    return f"{split}-p{index:05d}"


def part_states(out: Path, split: str) -> dict[int, Path]:
    """``{part index: record file}`` of the parts of ``split`` in ``out/.parts``."""
    found = {}
    for path in (Path(out) / PARTS_DIR).glob(f"{split}-p*.json"):
        match = re.fullmatch(rf"{re.escape(split)}-p(\d+)\.json", path.name)
        if match:
            found[int(match.group(1))] = path
    return found


class PartShardWriter(ResumableShardWriter):
    """Writes part ``index`` of ``parts`` of a split: shards ``{split}-p00003-000000.tar ...`` and its own record
    ``.parts/{split}-p00003.json`` (never the shared manifest, so parts on different machines write no common
    file); :func:`merge_parts` makes the manifest once every part is complete."""

    def __init__(self, out: str | Path, split: str, index: int, parts: int, **kwargs: Any) -> None:
        self.index, self.parts = index, parts
        super().__init__(out, split, **kwargs)

    prefix = property(lambda self: part_name(self.split, self.index))
    what = property(lambda self: f"{self.split} part {self.index} of {self.parts}")

    @property
    def state(self) -> Path:
        return self.out / PARTS_DIR / f"{self.prefix}.json"

    def _own_shards(self) -> list[Path]:
        return sorted(self.out.glob(f"{self.prefix}-*.tar"))

    def _load_entry(self, manifest: dict[str, Any] | None) -> dict[str, Any] | None:
        if not self.state.is_file():
            return None
        entry = json.loads(self.state.read_text())
        if entry.get("part") != [self.index, self.parts]:  # another prepare.parts: another way to split the inputs
            entry["config_hash"] = f"parts={entry.get('part', ['?', '?'])[1]}"
        return entry

    def _check_neighbours(self, manifest: dict[str, Any] | None, overwrite: bool) -> None:
        entry = (manifest or {}).get("splits", {}).get(self.split)
        mine = entry is not None and entry.get("parts", {}).get("count") == self.parts
        present = [s["name"] for s in (entry or {}).get("shards", []) if (self.out / s["name"]).is_file()]
        if present and not mine:
            raise ValueError(f"'{self.out}' already holds {self.split} shards of another run ({present[0]} ...); "
                             "a part never replaces them: choose another prepare.out, or run once without "
                             "prepare.parts with prepare.overwrite=true")
        strays = [p.name for p in self.out.glob(f"{self.split}-*.tar") if SINGLE_SHARD.fullmatch(p.name[len(self.split):])]
        if strays and manifest is None:
            raise ValueError(f"'{self.out}' holds {self.split} shards ({strays[0]} ...) without a gridgen "
                             "manifest.json; choose an empty prepare.out")

    def _save(self, manifest: dict[str, Any] | None = None) -> None:
        self.state.parent.mkdir(exist_ok=True)
        self.entry["part"] = [self.index, self.parts]
        write_json_atomic(self.state, {**self.entry, "header": self._header})

    def fail(self, error: BaseException) -> None:
        """Record why this part stopped (named by :func:`merge_parts`); its finished shards stay for the rerun."""
        self.abort()
        text = " ".join(str(error).split()) or type(error).__name__
        self.entry["error"] = f"{type(error).__name__}: {text}"[:300]
        self._save()

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        self.entry.pop("error", None)
        return super().close(extra)


def merge_parts(out: str | Path, split: str, parts: int | None = None, rerun: str = "",
                wait: bool = False) -> dict[str, Any] | None:
    """Check that every part of ``split`` in ``out`` is complete and write the split's manifest entry from them.

    Returns the merged entry. A part that is missing, failed or unfinished is a :class:`PartsIncompleteError`
    naming each of them and ``rerun`` (the command that reruns them, with ``{parts}`` for their indices), or, with
    ``wait`` (the merge a part attempts when it finishes), ``None``. ``parts``: the number of parts expected
    (``prepare.parts``); by default the one the parts' records give.
    """
    out = Path(out).expanduser()
    states = part_states(out, split)
    if not states:
        raise PartsIncompleteError(f"'{out}' holds no parts of {split} ({PARTS_DIR}/{split}-p*.json); run the parts "
                                   "first (prepare.parts=N prepare.part=i)")
    entries = {i: json.loads(path.read_text()) for i, path in sorted(states.items())}
    counts = {entry["part"][1] for entry in entries.values()}
    if len(counts) > 1 or (parts is not None and counts != {parts}):
        raise PartsIncompleteError(f"'{out}' holds {split} parts of runs with prepare.parts={sorted(counts)}"
                                   f"{f' (asked: {parts})' if parts is not None else ''}; keep one: rerun every part "
                                   "with one prepare.parts, or choose another prepare.out")
    total = counts.pop()
    problems, todo = [], []
    for i in range(total):
        entry = entries.get(i)
        if entry is None:
            problems.append(f"part {i} never started")
        elif entry.get("error"):
            problems.append(f"part {i} failed ({entry['error']})")
        elif not entry["complete"]:
            problems.append(f"part {i} has not finished ({len(entry['shards'])} shards so far: still running, or "
                            "killed)")
        else:
            continue
        todo.append(i)
    stray = sorted(set(entries) - set(range(total)))
    if stray:
        problems.append(f"part {stray[0]} is not a part of {total}")
    if problems:
        if wait:
            return None
        hint = rerun.format(parts=",".join(map(str, todo))) if rerun and todo else ""
        raise PartsIncompleteError(f"'{out}': {len(problems)} of {total} {split} parts are not done: "
                                   f"{'; '.join(problems)}" + (f"; rerun only those: {hint}" if hint else ""))
    hashes = {(e["config_hash"], e["inputs_hash"]) for e in entries.values()}
    if len(hashes) > 1:
        raise PartsIncompleteError(f"'{out}': the {split} parts were made with different settings or inputs; rerun "
                                   "them with one command (prepare.overwrite=true on the odd ones)")
    merged = empty_counts()
    shards = []
    for i, entry in sorted(entries.items()):
        part_counts = entry["counts"]
        for key in ("inputs_done", "samples", "frames"):
            merged[key] += part_counts[key]
        for group in ("skipped", "adjusted"):
            for reason, n in part_counts.get(group, {}).items():
                merged[group][reason] = merged[group].get(reason, 0) + n
        for reason, examples in part_counts["examples"].items():
            kept = merged["examples"].setdefault(reason, [])
            kept.extend(examples[: MAX_EXAMPLES - len(kept)])
        shards += [{**shard, "part": i} for shard in entry["shards"]]
    first = entries[0]
    seconds = [entries[i].get("seconds") or 0.0 for i in range(total)]
    entry = {
        "complete": True, "config_hash": first["config_hash"], "inputs": sum(e["inputs"] for e in entries.values()),
        "inputs_hash": first["inputs_hash"], "counts": merged, "shards": shards,
        **{key: first[key] for key in ("src", "seed", "config", "ignored_files") if key in first},
        "parts": {"count": total, "seconds": seconds},
        "seconds": round(sum(seconds), 3),  # summed over the parts: processing time, not the wall clock of the run
        "clips_per_sec": round(merged["inputs_done"] / sum(seconds), 3) if sum(seconds) > 0 else None,
    }
    with _locked(out):
        manifest = read_manifest(out) or {}
        manifest.update({"format": FORMAT, **first["header"]})
        manifest.setdefault("splits", {})[split] = entry
        write_json_atomic(out / MANIFEST, _with_totals(manifest))
    return entry
