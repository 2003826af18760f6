# Every target installs the project into .venv first (idempotent: pip skips what is present).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-samplers bench-likelihood bench-uncertainty bench-orchestration bench-throughput bench-gpu bench-data-parallel bench-fid-during-training bench-adaptive clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/orchestrator sweep sweeps/ddpm_vs_ncsn.yaml

# The integration tests (marked `integration`) mostly wait on Ray and MLflow: two pytest-xdist workers take whole
# files (module fixtures stay shared), the longest first (INTEGRATION_FIRST, then every other tests/test_*.py), and the
# unit tests run beside them at a lower priority (the integration tests' waits are the critical path), their output
# printed when both are done. Fails if either fails.
INTEGRATION_FIRST := tests/test_zoo.py tests/test_cluster.py tests/test_parallel.py tests/test_faults.py tests/test_orchestrator.py
test: $(STAMP)
	@unit_log=$$(mktemp); \
	nice -n 10 $(BIN)/python -m pytest -q -m "not integration" > $$unit_log 2>&1 & unit_pid=$$!; \
	$(BIN)/python -m pytest -q -m integration -n 2 --dist loadfile --no-loadscope-reorder --durations=15 $(INTEGRATION_FIRST) $(filter-out $(INTEGRATION_FIRST),$(sort $(wildcard tests/test_*.py))); integration=$$?; \
	wait $$unit_pid; unit=$$?; \
	echo "--- unit tests (pytest -m 'not integration') ---"; cat $$unit_log; rm -f $$unit_log; \
	echo "integration tests: exit $$integration; unit tests: exit $$unit"; \
	test $$integration -eq 0 -a $$unit -eq 0

bench: $(STAMP)
	$(BIN)/python benchmarks/demo.py

bench-samplers: $(STAMP)
	$(BIN)/python benchmarks/samplers.py

bench-likelihood: $(STAMP)
	$(BIN)/python benchmarks/likelihood.py

bench-uncertainty: $(STAMP)
	$(BIN)/python benchmarks/uncertainty.py

bench-orchestration: $(STAMP)
	$(BIN)/python benchmarks/orchestration.py

# needs diffusers (the optional extra `bench`), installed here
bench-throughput: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/throughput.py

# On a machine with a CUDA GPU: throughput with bf16 and compile, two trials sharing one GPU (under 10 minutes).
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu.py

bench-data-parallel: $(STAMP)
	$(BIN)/python benchmarks/data_parallel.py

bench-fid-during-training: $(STAMP)
	$(BIN)/python benchmarks/fid_during_training.py

# two real sweeps of 12 configurations, the grid and ASHA (about 20 minutes on 2 cores)
bench-adaptive: $(STAMP)
	$(BIN)/python benchmarks/adaptive.py

clean:
	rm -rf $(VENV) *.egg-info mlflow.db mlartifacts ray_results mlflow-server.log mlflow-server.json mlflow-server.lock
