# reprflow: the two commands.
#   make demo   - create/update .venv, install, run the quickstart pipeline on the embedded data
#   make test   - create/update .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Ray binds the machine's external address unless told otherwise: keep local runs on loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: demo test venv bench-data clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependency list changes. torch/torchvision are pinned to the releases this
# machine keeps on disk (the pip cap), so the install does not pull a new multi-GB build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) bench/measure.py -- $(VENV)/bin/reprflow run pipelines/quickstart.yaml --output out/quickstart

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

bench-data: $(STAMP)
	$(PY) bench/data_throughput.py

clean:
	rm -rf .reprflow out
