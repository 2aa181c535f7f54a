# CytoNode: `make demo` runs the main job, `make test` the whole suite.
# Both work on a fresh machine: they create .venv, install the package with its
# test extras and, as root, the Debian packages the tests use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEBS := dcmtk dicom3tools orthanc orthanc-dicomweb orthanc-wsi redis-server libturbojpeg0 chromium postgresql \
	nodejs

.PHONY: demo test deps debs bench-ingest bench-tiles clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

# The viewer's OpenSeadragon and the browser test's playwright-core, pinned by package-lock.json.
# Debian's nodejs comes without npm (a separate package); NodeSource's includes it.
node_modules/.installed: package.json package-lock.json
	command -v npm >/dev/null || { test "$$(id -u)" = 0 && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends npm; }
	npm ci --no-audit --no-fund
	touch $@

debs:
	@missing=""; \
	for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  else \
	    echo "missing Debian packages:$$missing (run make as root, or install them)" >&2; \
	  fi; \
	fi

deps: debs $(BIN)/.installed node_modules/.installed

# Two pytest workers: most tests wait on servers (Orthanc, PostgreSQL, our node, chromium),
# so two share the 2 cores well (9.4 against 13 minutes). `make test PYTEST_WORKERS=0` runs in one.
# With workers, every process the tests start computes on one thread (OMP_NUM_THREADS=1): torch's
# default of a thread per core had two workers' models contend for both cores (the three heaviest
# test files: 451 s against 205 s).
PYTEST_WORKERS ?= 2
PYTEST_ENV = $(if $(filter 0 1,$(PYTEST_WORKERS)),,OMP_NUM_THREADS=1)

test: deps
	$(PYTEST_ENV) $(BIN)/pytest -n $(PYTEST_WORKERS)

demo: deps
	$(BIN)/cytonode demo --exit

bench-ingest: deps
	$(BIN)/python bench/ingest.py

bench-tiles: deps
	$(BIN)/python bench/tiles.py

clean:
	rm -rf $(VENV) .pytest_cache node_modules
