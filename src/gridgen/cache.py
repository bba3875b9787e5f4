"""Cache entry point: ``python -m gridgen.cache data=<name> model=<name>`` (thin ``@hydra.main`` around ``cache``).

Encodes every source of a data config once with the model's VAE and text encoders (see
:mod:`gridgen.data.cache` for the format) so that training with ``data.cached=true`` loads neither.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gridgen.config import CONF_DIR, exit_on_user_error, register_resolvers
from gridgen.data.cache import cache_shards, load_encoders
from gridgen.data.datamodule import parse_sources, resolve_shards
from gridgen.data.sample import ensure_sample_shards

log = logging.getLogger("gridgen.cache")
register_resolvers()


def _choices() -> tuple[str | None, list[str]]:
    """The data config's name and the command-line overrides of this Hydra run (None, [] outside Hydra)."""
    if not HydraConfig.initialized():
        return None, []
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.runtime.choices.get("data"), list(hydra_cfg.overrides.task)


def cache_plan(data: DictConfig, out: Path, splits: list[str]) -> list[tuple[str, Path, dict[str, list[str]]]]:
    """``[(source name, output folder, {split: [shard url, ...]})]``: one folder per source of a mix."""
    if data.get("sample_data_root"):  # data=sample: the embedded shards are built on first use
        ensure_sample_shards(data.sample_data_root)
    allow_pipe = bool(data.get("allow_pipe", False))
    sources = parse_sources(data.get("train_shards"), data.get("sources"), data.get("weights"))
    single = not data.get("sources") and data.get("weights") is None
    plan = []
    for index, src in enumerate(sources):
        folder = out if single else out / (src.name if data.get("sources") else f"source{index}")
        shards: dict[str, list[str]] = {}
        if "train" in splits:
            shards["train"] = resolve_shards(src.shards, "train", name=src.config_key, allow_pipe=allow_pipe)
        if "val" in splits:
            if single and data.get("val_shards") is not None:
                shards["val"] = resolve_shards(data.val_shards, "val", name="val_shards", allow_pipe=allow_pipe)
            else:
                try:  # the val-*.tar next to a folder's train shards, if there are any
                    shards["val"] = resolve_shards(src.shards, "val", name=src.config_key, allow_pipe=allow_pipe)
                except FileNotFoundError:
                    log.info("source %s: no val shards next to its train shards; caching train only", src.name)
        plan.append((src.name, folder, shards))
    if data.get("val_shards") is not None and not single:
        log.warning("data.val_shards is not cached for a mix; each source's val-*.tar (if any) is")
    return plan


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cache(cfg: DictConfig) -> dict[str, Any]:
    """Build the cache(s) of ``cfg.data`` with ``cfg.model``; returns ``{source: manifest}``."""
    if cfg.data.get("cached"):
        raise ValueError("data.cached=true: `make cache` reads raw grid shards (image + json + txt) and writes the cache; "
                         "drop data.cached=true here (it is for training on the cache)")
    data_name, overrides = _choices()
    data_name = data_name or cfg.cache.get("data_name") or "<name>"
    rest = [o for o in overrides if not o.startswith(("data=", "model="))]
    command = " ".join(["make cache", f"data={data_name}", f"model={cfg.model.name}", *map(shlex.quote, rest)])
    out = Path(str(cfg.cache.out)).expanduser()
    plan = cache_plan(cfg.data, out, list(cfg.cache.splits))  # fails before loading the model if shards are missing
    model = OmegaConf.to_container(cfg.model, resolve=True)
    device = _device(str(cfg.cache.device))
    log.info("loading the VAE and text encoders of %s on %s", model["pretrained"], device)
    pipe = load_encoders(model, device)
    manifests = {}
    for name, folder, shards in plan:
        manifests[name] = cache_shards(
            pipe, shards, folder, model, batch_size=int(cfg.cache.batch_size),
            image_key=cfg.data.get("image_key", "png;jpg;jpeg"), caption_key=cfg.data.get("caption_key", "txt"),
            overwrite=bool(cfg.cache.overwrite), data_name=data_name, command=command,
        )
    # the training overrides that use this cache
    if not cfg.data.get("sources") and cfg.data.get("weights") is None:
        (_, folder, shards), = plan
        use = [f"data.train_shards={folder}"] + ([f"data.val_shards={folder}"] if "val" in shards else [])
    elif cfg.data.get("sources"):
        use = [f"data.sources.{name}.shards={folder}" for name, folder, _ in plan]
    else:
        use = ["data.train_shards=[" + ",".join(str(folder) for _, folder, _ in plan) + "]"]
    lines = []
    for name, folder, _ in plan:
        manifest = manifests[name]
        counts = ", ".join(f"{n} {split}" for split, n in manifest["counts"].items())
        lines.append(f"cache          {folder} ({counts} samples, {manifest['skipped']} skipped)")
    lines.append(f"train with     make train data={data_name} model={cfg.model.name} data.cached=true " + " ".join(use))
    print("\n".join(lines), flush=True)  # the entry point's answer to the user
    return manifests


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="cache")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error("cache"):  # bad input: one line, exit code 2, no traceback
        cache(cfg)


if __name__ == "__main__":
    main()
