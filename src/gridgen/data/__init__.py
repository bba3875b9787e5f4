"""Grid data: procedural sample shards (:mod:`.sample`) and the streaming :class:`GridDataModule` (:mod:`.datamodule`,
built from :mod:`.shardlists`, :mod:`.mixing`, :mod:`.decoding` and :mod:`.cache_format`).

The datamodule is imported lazily: it pulls in Lightning (seconds to import), which generating sample shards
(``make prepare``) does not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gridgen.data.sample import default_cache_root, ensure_sample_shards, write_sample_shards

if TYPE_CHECKING:
    from gridgen.data.datamodule import (
        GridDataModule,
        SkipCounter,
        batched_by_layout,
        collate_grid_samples,
        count_samples,
        layout_from_meta,
        resolve_shards,
    )

_DATAMODULE_NAMES = {
    "GridDataModule",
    "SkipCounter",
    "batched_by_layout",
    "collate_grid_samples",
    "count_samples",
    "layout_from_meta",
    "resolve_shards",
}

__all__ = [
    "GridDataModule",
    "SkipCounter",
    "batched_by_layout",
    "collate_grid_samples",
    "count_samples",
    "default_cache_root",
    "ensure_sample_shards",
    "layout_from_meta",
    "resolve_shards",
    "write_sample_shards",
]


def __getattr__(name: str) -> Any:
    if name in _DATAMODULE_NAMES:
        import gridgen.data.datamodule as datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
