"""The miniature GRID (``make mini``, issue 17): a world, a VAE, a base text-to-image model and grid LoRAs small
enough to train on 2 CPU cores, and the ablation of L_flow that the paper never published.

Everything runs through gridgen's own paths, in one process: ``prepare`` writes the world's shards
(:mod:`gridgen.embedded.mini_data`), ``gridgen.cache`` their latents, ``gridgen.train`` the base model (full
fine-tuning) and every grid LoRA, ``gridgen.evaluate`` generates the held-out grids and scores them (the world's
detector metrics and FVD). :mod:`.build` makes (and caches) what every run shares, :mod:`.runs` trains and evaluates
one variant and seed, :mod:`.report` writes the table and the figure; ``python -m gridgen.mini`` runs the three.

This package sits beside the entry points: it composes their configs and calls their functions, and nothing in the
library imports it.
"""
