# The README's two commands: `make demo` (set up, then train a flow on MNIST) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint format clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# `make demo` trains the multi-scale flow; `make demo MODEL=jet` the faithful Jet.
MODEL ?= multiscale
ifeq ($(MODEL),jet)
DEMO := --preset mnist --steps 600 --lr 3e-3
else
DEMO := --preset mnist-multiscale --steps 1200 --lr 1e-3
endif

demo: install
	$(BIN)/jetblocks train $(DEMO) --data mnist5k --eval-before --overwrite --out runs/demo-$(MODEL)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
