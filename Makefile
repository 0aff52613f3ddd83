# hybrid_twin: `make run` and `make test` each create .venv when missing and install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Set EXTRAS=dev,cuda on a CUDA machine to install JAX's CUDA wheels.
EXTRAS ?= dev

.PHONY: run test bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/hybrid-twin run configs/quickstart.yaml --out runs/quickstart

# A worker that dies (a compiler abort, say) fails the run at once and names its test
# (--dist loadfile can wait forever for a replaced worker); --capture=sys lets a native
# library's last words on stderr reach the log.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --max-worker-restart=0 --capture=sys \
		--durations=25 tests

bench: $(STAMP)
	$(PY) -m benchmarks.simulate --n 10000 --out benchmarks/results/simulate-cpu.jsonl

clean:
	rm -rf $(VENV) runs .pytest_cache
