"""Cache entry point: ``python -m gridgen.cache data=<name> model=<name>`` (thin ``@hydra.main`` around ``cache``).

Encodes every source of a data config once with the model's VAE and text encoders (see
:mod:`gridgen.data.cache` for the format) so that training with ``data.cached=true`` loads neither.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gridgen.config import CONF_DIR, exit_on_user_error, register_resolvers
from gridgen.data.cache import cache_shards, load_encoders
from gridgen.data.datamodule import parse_sources, resolve_shards
from gridgen.embedded import ensure_sample_shards
from gridgen.runtime import resolve_device, tune_cpu_process

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


def rank_and_world(opts: DictConfig) -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` of this process among those sharing the cache's shards.

    ``cache.rank`` + ``cache.world_size`` when set (a SLURM array through Hydra's submitit launcher:
    ``-m cache.rank='range(0,8)' cache.world_size=8``); else torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
    else srun's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (one task per GPU); else one process.
    """
    rank, world = opts.get("rank"), opts.get("world_size")
    if (rank is None) != (world is None):
        raise ValueError(f"set cache.rank and cache.world_size together (got cache.rank={rank}, "
                         f"cache.world_size={world}), e.g. -m cache.rank='range(0,8)' cache.world_size=8")
    if rank is not None:
        if not isinstance(world, int) or world < 1:
            raise ValueError(f"cache.world_size must be a positive integer, got {world!r}")
        return int(rank), world, 0
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


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
    rank, world, local_rank = rank_and_world(cfg.cache)
    if not 0 <= rank < world:
        raise ValueError(f"cache.rank must be one of 0..{world - 1} (cache.world_size={world}), got {rank}")
    device = resolve_device(str(cfg.cache.device), "cache.device", local_rank)
    tune_cpu_process(device)
    log.info("loading the VAE and text encoders of %s on %s%s", model["pretrained"], device,
             f" (rank {rank} of {world})" if world > 1 else "")
    pipe = load_encoders(model, device)
    manifests, first_task = {}, 0
    for name, folder, shards in plan:
        manifests[name] = cache_shards(
            pipe, shards, folder, model, batch_size=int(cfg.cache.batch_size),
            image_key=cfg.data.get("image_key", "png;jpg;jpeg"), caption_key=cfg.data.get("caption_key", "txt"),
            overwrite=bool(cfg.cache.overwrite), data_name=data_name, command=command,
            rank=rank, world_size=world, first_task=first_task,
        )
        first_task += sum(len(urls) for urls in shards.values())  # shards are dealt to ranks across folders
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
        if manifest["status"] == "complete":
            lines.append(f"cache          {folder} ({counts} samples, {manifest['skipped']} skipped)")
        else:
            lines.append(f"cache          {folder}: rank {rank} of {world} done; {len(manifest['missing'])} shards "
                         "of other ranks to go (the rank that finishes last writes cache.json)")
    lines.append(f"train with     make train data={data_name} model={cfg.model.name} data.cached=true " + " ".join(use))
    print("\n".join(lines), flush=True)  # the entry point's answer to the user
    return manifests


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="cache")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error("cache"):  # bad input: one line, exit code 2, no traceback
        cache(cfg)


if __name__ == "__main__":
    main()
