# Every target installs the project into .venv first (idempotent: pip skips what is present).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-samplers bench-likelihood bench-orchestration clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/orchestrator sweep sweeps/ddpm_vs_ncsn.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/demo.py

bench-samplers: $(STAMP)
	$(BIN)/python benchmarks/samplers.py

bench-likelihood: $(STAMP)
	$(BIN)/python benchmarks/likelihood.py

bench-orchestration: $(STAMP)
	$(BIN)/python benchmarks/orchestration.py

clean:
	rm -rf $(VENV) *.egg-info mlflow.db mlartifacts ray_results mlflow-server.log
