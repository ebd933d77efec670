# Two commands do everything: `make demo` and `make test`. Each creates .venv on first use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test bench clean-venv chromium bench-demo

# A Python >= 3.10; 3.11 first (this project's pinned torch wheel is built for it).
PYTHON_FOR_VENV = $(shell for p in python3.11 python3.12 python3.13 python3.10 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null && { echo $$p; break; }; done)

$(STAMP): requirements.txt requirements-nodeps.txt
	@if [ -z "$(PYTHON_FOR_VENV)" ]; then \
		echo "lensbench needs Python 3.10 or newer and found none."; \
		echo "On a Mac: install it from https://www.python.org/downloads/ or run 'brew install python@3.11', then run this again."; \
		exit 1; fi
	@[ -x $(PY) ] || $(PYTHON_FOR_VENV) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	@touch $(STAMP)

# Opens the app in your browser (not on CI, or on Linux without a display). ARGS="--share" for a public link.
demo: $(STAMP)
	$(PY) demo.py $(ARGS)

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	@touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/bench_lens.py
	$(PY) bench/bench_backends.py
	$(PY) bench/bench_llama_cpp.py
	$(PY) bench/bench_chat.py
	$(PY) bench/bench_patching.py
	$(PY) bench/bench_steering.py
	$(PY) bench/bench_attribution.py
	$(PY) bench/bench_attention.py
	$(PY) bench/bench_nnsight.py
	$(PY) bench/bench_lenses.py

# Debian's Chromium, for tests/test_browser.py and bench/bench_demo.py (Playwright drives it; its own
# browser download needs the network). Installs only when /usr/bin/chromium is missing.
chromium:
	@[ -x /usr/bin/chromium ] || { \
		if ! command -v apt-get >/dev/null; then echo "No apt-get here: install Chromium at /usr/bin/chromium, or skip the browser tests."; exit 1; fi; \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

bench-demo: $(TEST_STAMP) chromium
	$(PY) bench/bench_demo.py

clean-venv:
	rm -rf $(VENV)
