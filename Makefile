# The README's commands: `make serve` and `make test`; `make build` / `make containerize` to ship.
# Everything runs from the venv's own bin/ (no activation needed). Python 3.10 or 3.11:
# `make serve PYTHON=python3.11` where `python3` is another version.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := demo
# `make serve` listens on 127.0.0.1 only; HOST=0.0.0.0 listens on every interface.
HOST ?= 127.0.0.1
PORT ?= 3000
TORCH_VERSION ?= 2.13.0
# Where torch comes from. Unset: PyTorch's CPU wheel index when it answers within 5 s (a bare
# `pip install torch` on Linux pulls the multi-GB CUDA build), else the default index. For CUDA:
# TORCH_INDEX=https://download.pytorch.org/whl/cu126 (or the index matching your driver).
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
IMAGE ?= recbole-bento:latest

.PHONY: install install-dev java redis chromium serve demo-model build containerize test test-fast lint clean bench-peers-env

# Runtime only: what `make serve`, `make build` and a server need.
$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@index="$(TORCH_INDEX)"; \
	if [ -z "$$index" ] && $(BIN)/python -c "import urllib.request as r; r.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" 2>/dev/null; \
	then index="$(TORCH_CPU_INDEX)"; fi; \
	echo "installing torch==$(TORCH_VERSION) from $${index:-the default index}"; \
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $${index:+--index-url $$index}
	$(BIN)/python -m pip install -q -e .
	touch $@

# The test, lint and benchmark tools on top.
$(VENV)/.dev: $(VENV)/.runtime
	$(BIN)/python -m pip install -q -e '.[dev,index]'
	touch $@

# tests/test_spark.py runs Spark on local[2]: a Java runtime from the Debian packages when missing.
java:
	@command -v java >/dev/null || (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless)

# tests/test_sessions.py starts a real Redis: the server from the Debian packages when missing.
redis:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)

# tests/test_playground.py drives the playground in a headless chromium through Playwright (whose own
# browser download needs the network): Debian's chromium when missing.
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev java redis chromium

$(DEMO)/SASRec.pth: | $(VENV)/.runtime
	$(BIN)/python -m devtools.training --model SASRec --out $(DEMO)

# Imported once; `make serve` then serves this tag (re-imported only if the store lost it). The
# genres and release years of ml-100k.item (shipped with recbole) become filterable attributes.
$(DEMO)/tag: $(DEMO)/SASRec.pth
	$(BIN)/python import_model.py $(DEMO)/SASRec.pth --dataset-pickle $(DEMO)/ml-100k-SASRec-dataset.pkl \
		--item-features "$$($(BIN)/python -c 'import devtools.training as t; print(t.RECBOLE_DATASETS / "ml-100k" / "ml-100k.item")')" \
		--name sasrec-ml-100k --label source=demo > $@.tmp
	mv $@.tmp $@

demo-model: $(DEMO)/tag
	@$(BIN)/bentoml models get "$$(tail -1 $(DEMO)/tag)" > /dev/null 2>&1 || { rm -f $(DEMO)/tag; $(MAKE) $(DEMO)/tag; }
	@echo "model $$(tail -1 $(DEMO)/tag)"

serve: demo-model
	@echo "once it is up, try it in a browser: http://$(HOST):$(PORT)/playground"
	RECBOLE_BENTO_MODEL=$$(tail -1 $(DEMO)/tag) $(BIN)/bentoml serve . --host $(HOST) --port $(PORT)

build: demo-model
	RECBOLE_BENTO_MODEL=$$(tail -1 $(DEMO)/tag) $(BIN)/bentoml build .

containerize: | $(VENV)/.runtime
	$(BIN)/bentoml containerize recbole-bento:latest -t $(IMAGE)

lint: | $(VENV)/.dev
	$(BIN)/ruff check .

test: lint java redis chromium
	$(BIN)/python -m pytest -q tests

# Everything that needs no trained model and no server: a couple of minutes.
test-fast: lint
	$(BIN)/python -m pytest -q -m "not server and not slow" tests

# The benchmark's peers (LitServe, Ray Serve) in their own venv, and wrk: docs/benchmarks.md.
bench-peers-env:
	bench/peers/setup.sh

clean:
	rm -rf $(DEMO) $(VENV)
