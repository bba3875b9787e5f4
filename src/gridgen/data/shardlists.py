"""Shard specs -> shard URLs, sample counts, and a quick check that local shards are tar files with samples.

A shard spec is a folder, a brace or glob pattern, a ``pipe:`` command or an s3/gs/http URL, or a list of these.
``pipe:`` runs its text through a shell (webdataset's ``gopen_pipe``), so it is refused unless the run opts in
with ``data.allow_pipe=true``: a config or a preset from someone else must not run commands by accident.
Errors are one line naming the shard (or spec) and the fix; everything is checked in ``GridDataModule.setup``,
before the first step, instead of a long run dying after 1000 unreadable samples.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import webdataset as wds
from webdataset.tariterators import base_plus_ext

log = logging.getLogger(__name__)

ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]

FIX_HINT = "run `make prepare` or point data.{name} at a folder of WebDataset shards"
PIPE_KEY = "data.allow_pipe"


class ShardError(ValueError):
    """A shard that cannot be trained on (not a tar file, no samples, unusable first samples)."""


def is_remote(url: str) -> bool:
    """``pipe:...``, ``http://...``, ``s3://...``: anything webdataset opens that is not a local path."""
    scheme = urlparse(url).scheme
    return url.startswith("pipe:") or (len(scheme) > 1 and scheme != "file")  # len>1: not a drive letter


def local_path(url: str) -> Path:
    return Path(url.removeprefix("file:"))


def resolve_shards(spec: ShardSpec, split: str = "train", name: str | None = None, allow_pipe: bool = False
                   ) -> list[str]:
    """Expand a shard spec into a list of shard URLs.

    ``spec`` is a folder (every ``{split}-*.tar`` in it, sorted; if there are none, those of its direct
    subfolders, so the root of :func:`~gridgen.embedded.ensure_sample_shards` works), a brace or glob pattern
    (``.../train-{000000..000003}.tar``), a ``pipe:`` / URL string (passed through unchecked), or a list of any
    of these. Local shards must exist; otherwise a one-line :class:`FileNotFoundError` names the path and the fix.
    ``pipe:`` URLs need ``allow_pipe`` (``data.allow_pipe=true``). ``name`` is the config key mentioned in the
    messages (default ``{split}_shards``).
    """
    key = name or f"{split}_shards"
    hint = FIX_HINT.format(name=key)
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if not items:
        raise FileNotFoundError(f"no {split} shards given (empty list); {hint}")
    urls: list[str] = []
    for item in items:
        text = os.fspath(item)
        if is_remote(text):
            urls.extend(wds.shardlists.expand_urls(text))
            continue
        text = text.removeprefix("file:")
        path = Path(text).expanduser()
        if path.is_dir():
            pattern = f"{split}-*.tar"
            found = sorted(path.glob(pattern)) or sorted(path.glob(f"*/{pattern}"))
            if not found:
                raise FileNotFoundError(f"no shards matching {pattern!r} in '{path}'; {hint}")
            urls.extend(str(p) for p in found)
            continue
        missing = []
        for expanded in wds.shardlists.expand_urls(str(path)):  # braces (and webdataset's '::' lists)
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise FileNotFoundError(f"no shards matching '{expanded}'; {hint}")
                urls.extend(matches)
            elif Path(expanded).is_file():
                urls.append(expanded)
            else:
                missing.append(expanded)
        if len(missing) == 1:
            raise FileNotFoundError(f"shard or folder '{missing[0]}' does not exist; {hint}")
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shards of '{path}' do not exist ('{missing[0]}' ... '{missing[-1]}'); {hint}"
            )
    piped = [url for url in urls if url.startswith("pipe:")]
    if piped and not allow_pipe:
        raise ValueError(f"data.{key} {piped[0]!r} runs a shell command (pipe:); set {PIPE_KEY}=true to allow "
                         "pipe: shards (only for commands you trust), or give a folder, pattern or URL")
    return urls


def _manifest_counts(folder: Path) -> dict[str, int]:
    """``{shard file name: samples}`` from the folder's ``manifest.json`` (``make prepare``) or ``cache.json``
    (``make cache``); empty if there is neither."""
    counts: dict[str, int] = {}
    for name in ("manifest.json", "cache.json"):
        try:
            manifest = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(manifest, dict):
            continue
        shards = manifest.get("shards")
        if name == "cache.json" and isinstance(shards, dict):
            counts.update({k: int(v["samples"]) for k, v in shards.items() if isinstance(v, dict) and "samples" in v})
        splits = manifest.get("splits")
        for split in splits.values() if isinstance(splits, dict) else []:
            for shard in split.get("shards", []) if isinstance(split, dict) else []:
                if isinstance(shard, dict) and "name" in shard and "samples" in shard:
                    counts[shard["name"]] = int(shard["samples"])
    return counts


def _sample_key(member: tarfile.TarInfo) -> str | None:
    """The webdataset sample key of a tar member (``None``: not a sample file, e.g. ``__meta__`` or a folder)."""
    prefix, _ = base_plus_ext(member.name)
    # "__xyz__" members are webdataset metadata, not samples
    if member.isreg() and prefix is not None and not Path(member.name).name.startswith("__"):
        return prefix
    return None


def count_samples(urls: Iterable[str]) -> int:
    """Number of samples in local tar shards.

    Taken from the shard folder's manifest (``manifest.json`` of ``make prepare``, ``cache.json`` of ``make
    cache``) when it lists the shard, so that starting a run on 10K shards does not read 10M tar headers;
    otherwise counted from the tar headers (distinct keys), never from the data.
    """
    total = 0
    manifests: dict[Path, dict[str, int]] = {}
    for url in urls:
        if is_remote(url):
            raise ValueError(
                f"cannot count the samples of remote shard {url!r}; set data.samples_per_epoch explicitly"
            )
        path = local_path(url)
        listed = manifests.setdefault(path.parent, _manifest_counts(path.parent))
        if path.name in listed:
            total += listed[path.name]
            continue
        keys: set[str] = set()
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    key = _sample_key(member)
                    if key is not None:
                        keys.add(key)
        except (tarfile.TarError, OSError) as exn:
            # the loader skips what it cannot read too; count what is readable and say so
            log.warning("shard %s is damaged (%s); counting its %d readable samples", url, exn, len(keys))
        total += len(keys)
    return total


def check_shard_headers(urls: Iterable[str], key: str) -> None:
    """Every local shard is a readable tar file whose first members form a sample (reads one header each).

    ``key`` is the config key the shards come from (``train_shards``, ``sources.webvid.shards``). Remote shards
    are not opened here (that would run their command or download them once more per process).
    """
    for url in urls:
        if is_remote(url):
            continue
        path = local_path(url)
        fix = f"re-create it with `make prepare` (or `make cache`) or remove it from data.{key}"
        try:
            with tarfile.open(path) as tar:
                for _ in range(16):  # a few leading metadata members (``__info__``) may come first
                    member = tar.next()
                    if member is None or _sample_key(member) is not None:
                        break
        except (tarfile.TarError, OSError, EOFError) as exn:
            why = " ".join(str(exn).split())  # tarfile lists one reason per compression it tried, on lines
            raise ShardError(f"shard '{path}' is not a readable tar file ({type(exn).__name__}: {why}); {fix}") from exn
        if member is None or _sample_key(member) is None:
            raise ShardError(f"shard '{path}' holds no samples; {fix}")
