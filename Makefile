# Two commands for a newcomer: `make study` and `make test`. Both build .venv first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
SPACE   ?= search_spaces/smoke.yaml
# Two test workers (pytest-xdist): much of a study test is waiting on process and Ray start-up
# and on trials' clocks, so two overlap well even on 2 cores (12.8 -> 9.4 min here, idle).
XDIST   ?= -n 2

.PHONY: install test test-all test-ui study reproduce recheck bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exact: the CPU wheel on disk, never the CUDA build from the registry
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) --durations=15

test-all: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m ''

# The MLflow UI in headless Chromium (about 3 min); needs the `ui` extra and a system Chromium
# (tests/ui/check_mlflow_ui.py says how). Refreshes the screenshots in docs/screenshots.
test-ui: $(STAMP)
	$(PY) tests/ui/check_mlflow_ui.py --screenshots docs/screenshots

study: $(STAMP)
	$(VENV)/bin/nc-study run $(SPACE)
	$(VENV)/bin/nc-study analyze smoke --out reports/smoke

# The thesis' experiments in full (about 16 h on 2 cores, more on a slower host), then the reports in docs/results/:
# the thesis' 100 % convergence rule, and a 99.9 % check beside it. Restartable: each study
# resumes. The MLflow store and Ray's checkpoints live in RUNS, outside the work tree, so a
# fresh checkout on the same machine resumes them too.
STUDIES := fig3_3 depth_sweep data_complexity_teacher data_complexity_conic mnist1d_wd paper_data conic_wd fig3_1
# report folder under docs/results : the experiment(s) it analyses
REPORTS := fig3_3:fig3_3 depth_sweep:depth_sweep data_complexity:data_complexity_teacher,data_complexity_conic \
           mnist1d_wd:mnist1d_wd paper_data:paper_data conic_wd:conic_wd fig3_1:fig3_1
RUNS    ?= $(HOME)/nc-runs
RUNFLAGS = --tracking-uri sqlite:///$(RUNS)/mlflow.db
# A study's MLflow record kept in git (RECORDS/<study>.jsonl.gz, `nc-study export`: a finished
# study's, beside its report, or one stopped part-way on a machine that did not last) is imported
# first when RUNS lacks the study; the run then trains only the trials it does not hold as
# trained (none for a finished study: its reports are re-made from the record alone).
RECORDS := docs/results/records
reproduce: $(STAMP)
	mkdir -p $(RUNS)
	for s in $(STUDIES); do \
	  if [ -f $(RECORDS)/$$s.jsonl.gz ]; then \
	    $(VENV)/bin/nc-study import $(RECORDS)/$$s.jsonl.gz $(RUNFLAGS) --if-absent || exit $$?; fi; \
	  $(VENV)/bin/nc-study run search_spaces/$$s.yaml $(RUNFLAGS) --storage-path $(RUNS)/ray_results || exit $$?; done
	for r in $(REPORTS); do \
	  out=$${r%%:*}; exps=$$(echo $${r#*:} | tr , ' '); \
	  $(VENV)/bin/nc-study analyze $$exps $(RUNFLAGS) --out docs/results/$$out && \
	  $(VENV)/bin/nc-study analyze $$exps $(RUNFLAGS) --out docs/results/$${out}_acc999 --min-train-acc 0.999 --no-log \
	  || exit $$?; \
	done
	$(PY) -m analysis.glance docs/results --write docs/results/README.md

# Every published report whose studies all have a record, re-made from the records alone in a
# temporary store and compared with what is published (`nc-study recheck`; a few minutes); then
# the verdict table of docs/results/README.md against the reports (`python -m analysis.glance`).
recheck: $(STAMP)
	status=0; for r in $(REPORTS); do \
	  out=$${r%%:*}; exps=$$(echo $${r#*:} | tr , ' '); missing=""; \
	  for e in $$exps; do [ -f $(RECORDS)/$$e.jsonl.gz ] || missing="$$missing $$e"; done; \
	  if [ -n "$$missing" ]; then echo "docs/results/$$out: not re-checked, no record of$$missing"; continue; fi; \
	  for d in docs/results/$$out docs/results/$${out}_acc999; do \
	    [ -f $$d/conjectures.json ] || continue; \
	    $(VENV)/bin/nc-study recheck $$d --records $(RECORDS) || status=1; done; \
	done; \
	$(PY) -m analysis.glance docs/results --check docs/results/README.md || status=1; exit $$status

bench: $(STAMP)
	$(PY) -m study.bench

clean:
	rm -rf $(VENV) *.egg-info
