# The README's two commands: `make serve` and `make test`. Everything else is set-up they call.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := demo
PORT ?= 3000

.PHONY: install java serve demo-model test lint clean bench-peers-env

# CPU torch first: a bare `torch` requirement with nothing installed pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# tests/test_spark.py runs Spark on local[2]: a Java runtime from the Debian packages when missing.
java:
	@command -v java >/dev/null || (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless)

install: $(VENV)/.installed java

$(DEMO)/SASRec.pth: | $(VENV)/.installed
	$(BIN)/python -m devtools.training --model SASRec --out $(DEMO)

demo-model: $(DEMO)/SASRec.pth
	$(BIN)/python import_model.py $(DEMO)/SASRec.pth --dataset-pickle $(DEMO)/ml-100k-SASRec-dataset.pkl --name sasrec-ml-100k --label source=demo > $(DEMO)/tag
	@echo "imported $$(tail -1 $(DEMO)/tag)"

serve: demo-model
	RECBOLE_BENTO_MODEL=$$(tail -1 $(DEMO)/tag) $(BIN)/bentoml serve . --port $(PORT)

lint: | $(VENV)/.installed
	$(BIN)/ruff check .

test: lint java
	$(BIN)/python -m pytest -q tests

# The benchmark's peers (LitServe, Ray Serve) in their own venv, and wrk: docs/benchmarks.md.
bench-peers-env:
	bench/peers/setup.sh

clean:
	rm -rf $(DEMO) $(VENV)
