"""Grid data: raw sources -> grid shards (:mod:`.prepare`) and the streaming :class:`GridDataModule`
(:mod:`.datamodule`, built from :mod:`.shardlists`, :mod:`.mixing`, :mod:`.decoding` and :mod:`.cache_format`).
The procedural sample data lives in :mod:`gridgen.embedded.sample_data`.

The datamodule is imported lazily: it pulls in Lightning (seconds to import), which ``make prepare`` does not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
    "layout_from_meta",
    "resolve_shards",
]


def __getattr__(name: str) -> Any:
    if name in _DATAMODULE_NAMES:
        import gridgen.data.datamodule as datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
