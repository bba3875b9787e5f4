"""The on-disk format of latent/text caches and the checks that a cache belongs to this run (no model code).

A cache folder (written by :func:`gridgen.data.cache.cache_shards`) holds, per sample key, a
``<key>.cache.safetensors`` member (``latents``, ``prompt_embeds``, ``pooled_prompt_embeds``, ``text_mask``), the
json (with a ``gridgen_cache`` fingerprint + layout hash) and the caption, plus a manifest ``cache.json``. The
streaming reader (:mod:`gridgen.data.decoding`, :mod:`gridgen.data.datamodule`) and the writer both use this
module; it imports neither of them, so the data package has no import cycle. Tensors are read with safetensors
only: a cache is never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from gridgen.data.shardlists import is_remote, local_path
from gridgen.layout import GridLayout

CACHE_FORMAT = "gridgen-cache/1"
CACHE_MANIFEST = "cache.json"
CACHE_MEMBER = "cache.safetensors"  # the sample member holding the tensors
CACHE_TENSORS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "text_mask")
# what a cache depends on; named like the model config keys so that messages can say `model.<key>=...`
FINGERPRINT_KEYS = ("pretrained", "revision", "variant", "max_sequence_length")
REBUILD = "make cache data={data} model={model}"


class CacheMismatchError(ValueError):
    """A cache that does not belong to this run (another model, max sequence length or layout); never skipped."""


def cache_fingerprint(model: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a model config a cache depends on: ``{pretrained, revision, variant, max_sequence_length}``."""
    if model.get("pretrained") in (None, ""):
        raise ValueError("the cache fingerprint needs model.pretrained (the model id the cache is built with)")
    return {
        "pretrained": str(model["pretrained"]).strip(),
        "revision": None if model.get("revision") in (None, "") else str(model["revision"]),
        "variant": None if model.get("variant") in (None, "") else str(model["variant"]),
        "max_sequence_length": int(model["max_sequence_length"]),
    }


def layout_hash(fingerprint: Mapping[str, Any], layout: GridLayout) -> str:
    """Hash of (model id, revision, variant, max sequence length, layout and resolution, cache format)."""
    payload = {**{k: fingerprint.get(k) for k in FINGERPRINT_KEYS}, "format": CACHE_FORMAT,
               "layout": layout.name, "height": layout.height, "width": layout.width}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _mismatch(built: Mapping[str, Any], expected: Mapping[str, Any], where: str, data: str) -> str | None:
    """One line naming the first fingerprint value that differs and both fixes; None when they agree."""
    built_name, run_name = built.get("name") or "<model>", expected.get("name") or "<model>"
    for key in FINGERPRINT_KEYS:
        have, want = built.get(key), expected.get(key)
        if have == want:
            continue
        if key == "pretrained":
            return (f"{where} was built for model.pretrained={have} (model={built_name}), this run uses "
                    f"model.pretrained={want}; rebuild it with `{REBUILD.format(data=data, model=run_name)}` "
                    f"or train on it with model={built_name}")
        return (f"{where} was built with model.{key}={have}, this run uses model.{key}={want}; rebuild it with "
                f"`{REBUILD.format(data=data, model=run_name)} model.{key}={want}` or train with model.{key}={have}")
    return None


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's ``cache.json`` (``None`` if there is none); a damaged one is a one-line error."""
    path = Path(folder) / CACHE_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exn:
        raise CacheMismatchError(f"cache manifest '{path}' is unreadable ({exn}); rebuild the cache with "
                                 "`make cache data=<name> model=<name>` (cache.overwrite=true)") from exn
    if not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint"), dict):
        raise CacheMismatchError(f"cache manifest '{path}' has no fingerprint (not written by `make cache`?); "
                                 "rebuild the cache with `make cache data=<name> model=<name>` (cache.overwrite=true)")
    return manifest


def verify_cache_folders(urls: Iterable[str], expected: Mapping[str, Any]) -> None:
    """Check the manifest of every local folder among ``urls`` against the run's model; raise one line if stale.

    Remote shards (``pipe:``, URLs) have no readable folder: their samples are checked one by one as they stream
    (:func:`check_cached_sample`).
    """
    expected_fp = cache_fingerprint(expected)
    folders = sorted({str(local_path(u).parent) for u in urls if not is_remote(u)})
    for folder in folders:
        manifest = read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(
                f"'{folder}' holds no gridgen cache (no {CACHE_MANIFEST}): data.cached=true trains on shards written "
                f"by `make cache data=<name> model=<name>`; build one, or set data.cached=false to train on raw shards"
            )
        if manifest.get("format") != CACHE_FORMAT:
            raise CacheMismatchError(
                f"cache '{folder}' has format {manifest.get('format')!r}, this gridgen reads {CACHE_FORMAT!r}; "
                f"rebuild it with `{manifest.get('command') or 'make cache'}`"
            )
        built = {**manifest["fingerprint"], "name": manifest.get("model")}
        problem = _mismatch(built, {**expected_fp, "name": expected.get("name")}, f"cache '{folder}'",
                            manifest.get("data") or "<name>")
        if problem:
            raise CacheMismatchError(problem)
        if manifest.get("status") != "complete":
            raise CacheMismatchError(
                f"cache '{folder}' is incomplete (`make cache` was interrupted); run `{manifest.get('command')}` "
                "again to finish it (finished shards are kept)"
            )


def check_cached_sample(key: str, meta: Mapping[str, Any], layout: GridLayout, tensors: Mapping[str, Any],
                        expected: Mapping[str, Any]) -> None:
    """A streamed cached sample belongs to this run: fingerprint hash, latent tokens and text length agree."""
    info = meta.get("gridgen_cache")
    if not isinstance(info, Mapping) or "latents" not in tensors:
        raise CacheMismatchError(
            f"sample {key!r} carries no cached latents (no {CACHE_MEMBER} / gridgen_cache): data.cached=true trains "
            "on shards written by `make cache data=<name> model=<name>`; point the shards there or set data.cached=false"
        )
    expected_fp = cache_fingerprint(expected)
    if info.get("hash") != layout_hash(expected_fp, layout):
        built = {**{k: info.get(k) for k in FINGERPRINT_KEYS}, "name": info.get("name")}
        problem = _mismatch(built, {**expected_fp, "name": expected.get("name")}, f"cached sample {key!r}",
                            info.get("data") or "<name>")
        raise CacheMismatchError(problem or (
            f"cached sample {key!r} was built for another layout or cache format than its json says ({layout.name}, "
            f"{layout.height}x{layout.width} px); rebuild the cache with `make cache`"))
    latents, embeds = tensors["latents"], tensors.get("prompt_embeds")
    if tuple(latents.shape) != (layout.num_tokens, 64):
        raise CacheMismatchError(f"cached sample {key!r} has latents {tuple(latents.shape)}, layout {layout.name} of "
                                 f"{layout.height}x{layout.width} px needs ({layout.num_tokens}, 64); rebuild the cache")
    if embeds is not None and embeds.shape[0] != expected_fp["max_sequence_length"]:
        raise CacheMismatchError(f"cached sample {key!r} has {embeds.shape[0]} text tokens, model.max_sequence_length="
                                 f"{expected_fp['max_sequence_length']}; rebuild the cache with that length")


def load_cached_sample(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of one ``cache.safetensors`` member (safetensors: no code runs while reading it)."""
    import safetensors.torch

    return safetensors.torch.load(bytes(data))
