# Two commands for a newcomer: `make study` and `make test`. Both build .venv first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
SPACE   ?= search_spaces/smoke.yaml

.PHONY: install test test-all study reproduce bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exact: the CPU wheel on disk, never the CUDA build from the registry
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

study: $(STAMP)
	$(VENV)/bin/nc-study run $(SPACE)
	$(VENV)/bin/nc-study analyze smoke --out reports/smoke

# The thesis' experiments in full (about 4 h on 2 cores). Restartable: each study resumes.
reproduce: $(STAMP)
	$(VENV)/bin/nc-study run search_spaces/fig3_1.yaml
	$(VENV)/bin/nc-study run search_spaces/fig3_3.yaml
	$(VENV)/bin/nc-study run search_spaces/paper_data.yaml
	$(VENV)/bin/nc-study analyze fig3_1 --out docs/results/fig3_1
	$(VENV)/bin/nc-study analyze fig3_3 --out docs/results/fig3_3
	$(VENV)/bin/nc-study analyze paper_data --out docs/results/paper_data

bench: $(STAMP)
	$(PY) -m study.bench

clean:
	rm -rf $(VENV) *.egg-info
