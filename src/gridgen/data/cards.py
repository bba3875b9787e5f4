"""Data cards: one Markdown file per dataset in ``gridgen/data_cards/`` whose YAML front matter is the dataset's truth.

A card states where a dataset comes from, its licence, its raw layout, how gridgen turns it into grids
(layout, cell size, frame sampling, captions, shard sizes), what to expect and the exact prepare command.
Configs read it instead of repeating it: ``${gridgen_card:webvid,preprocessing.layout}`` in a YAML file, or
``load_card("webvid")["preprocessing"]["layout"]`` in Python. The Markdown body below the front matter is
for people and is returned under ``"body"`` only by :func:`read_card`.
"""

from __future__ import annotations

import copy
import functools
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# The cards are package data (gridgen/data_cards, in the wheel as in a checkout); GRIDGEN_DATA_CARDS points elsewhere.
CARDS_DIR = Path(os.environ.get("GRIDGEN_DATA_CARDS") or str(resources.files("gridgen") / "data_cards"))

REQUIRED_KEYS = (
    "name", "title", "kind", "source", "licence", "obtain", "raw", "preprocessing", "captioning",
    "expected", "shards", "known_issues", "prepare_command",
)


def card_path(name: str) -> Path:
    return CARDS_DIR / f"{name}.md"


def available_cards() -> list[str]:
    return sorted(p.stem for p in CARDS_DIR.glob("*.md") if not p.name.startswith(("README", "_")))


@functools.lru_cache(maxsize=64)
def _parse(path: str, mtime_ns: int) -> tuple[dict[str, Any], str]:
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ValueError(f"data card '{path}' has no YAML front matter (it must start with a '---' line)")
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError(f"data card '{path}': the YAML front matter is not closed by a '---' line")
    front = yaml.safe_load(text[4:end]) or {}
    if not isinstance(front, dict):
        raise ValueError(f"data card '{path}': the front matter must be a mapping, got {type(front).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in front]
    if missing:
        raise ValueError(f"data card '{path}' lacks the keys {missing}; every card states {list(REQUIRED_KEYS)}")
    return front, text[end + 5:]


def read_card(name: str) -> dict[str, Any]:
    """The front matter of ``data_cards/<name>.md`` plus its Markdown ``body``."""
    path = card_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no data card '{name}' in '{CARDS_DIR}' (have: {', '.join(available_cards())})")
    front, body = _parse(str(path), path.stat().st_mtime_ns)
    return {**copy.deepcopy(front), "body": body}


def load_card(name: str) -> dict[str, Any]:
    """The machine-readable part (YAML front matter) of ``data_cards/<name>.md`` as a dict (a fresh copy)."""
    card = read_card(name)
    card.pop("body")
    return card


def card_value(name: str, key: str | None = None) -> Any:
    """``card_value("webvid", "preprocessing.layout")`` -> ``"4x4"``: one value of a card by dotted key.

    This is the ``gridgen_card`` OmegaConf resolver: ``${gridgen_card:webvid,preprocessing.layout}``.
    """
    value: Any = load_card(name)
    if not key:
        return value
    walked = []
    for part in str(key).split("."):
        walked.append(part)
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"data card '{name}' has no key '{'.'.join(walked)}' (see {card_path(name)})")
        value = value[part]
    return value


def register_card_resolver() -> None:
    """Register ``${gridgen_card:<name>[,<dotted.key>]}`` with OmegaConf (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("gridgen_card"):
        OmegaConf.register_new_resolver("gridgen_card", card_value)
