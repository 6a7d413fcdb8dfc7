# The two commands of the README: `make demo` and `make test`. Both set up .venv first
# (torch==2.13.0 before anything else, so pip never resolves a newer, CUDA-sized torch).
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export OMP_WAIT_POLICY := PASSIVE
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup demo test test-quick lint ui serve bench study clean gpu-check gpu-wheels

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/orchestrator data synth data/synth --train 96 --val 24 --size 256x144
	$(BIN)/orchestrator data pack data/synth data/shards --shard-size 32
	$(BIN)/orchestrator sweep jobs/smoke.yaml
	$(BIN)/orchestrator ensemble --top 3 --experiment smoke
	$(BIN)/orchestrator report --experiment smoke --out data/report

# The normalization study at proxy scale (jobs/study_proxy.yaml: 84 trials, about 3 h on 2 cores); its
# document, docs/study-proxy.md, is what `orchestrator report` writes from the MLflow runs. A failed trial is
# a result (the report gives its reason), so the sweep's exit status does not stop the ensemble and report.
study: setup
	$(BIN)/orchestrator data synth data/study/synth --train 256 --val 128 --size 128x72 --seed 0
	$(BIN)/orchestrator data pack data/study/synth data/study/shards --shard-size 32
	-$(BIN)/orchestrator sweep jobs/study_proxy.yaml
	$(BIN)/orchestrator ensemble --top 3 --experiment study_proxy
	$(BIN)/orchestrator report --experiment study_proxy --doc docs/study-proxy.md --baseline bn --baseline gn:c16

test: setup lint
	$(PY) -m pytest -q

test-quick: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check orchestrator tests bench
	$(BIN)/ruff format --check orchestrator tests bench

# Every benchmark at its quick size (~6 min on 2 idle cores), one table of all figures (bench/__main__.py).
bench: setup
	$(PY) -m bench

# The GPU check (bench/gpu_check.py), made to run on a lent GPU machine as it is: its Python with torch, no
# .venv; pytest comes from the wheels `make gpu-wheels` puts in .whl/gpu-check (carry that folder there).
# GPU_CHECK_DRY=1 runs it on the CPU at tiny sizes.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check

gpu-wheels: setup
	$(BIN)/pip download -q --only-binary=:all: --python-version 3.12 --implementation py --abi none \
		--platform any -d .whl/gpu-check pytest

ui: setup
	@echo "MLflow UI on http://127.0.0.1:5000: sweep, ensemble and report print the link to their runs"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --backend-store-uri sqlite:///mlflow.db \
		--host 127.0.0.1 --port 5000 --workers 1

# A registered model's champion over REST on 127.0.0.1 (`make serve MODEL=smoke PORT=5001`): `mlflow models
# serve` starts uvicorn by name, so the venv goes on PATH; the registry is MLflow's at MLFLOW_TRACKING_URI,
# else this folder's mlflow.db, as for every orchestrator command.
MODEL ?= smoke
PORT ?= 5001
serve: setup
	PATH="$(abspath $(BIN)):$$PATH" MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}" \
		$(BIN)/mlflow models serve -m "models:/$(MODEL)@champion" --env-manager local -h 127.0.0.1 -p $(PORT)

clean:
	rm -rf data runs mlruns mlflow.db
