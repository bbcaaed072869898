# Two entry points for a fresh clone; each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench venv clean

demo: $(STAMP)
	$(VENV)/bin/stpp-ray run -c jobs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The pure core and one smoke pipeline on Ray (tests marked `ray` or `multiprocess` run in `make test` only).
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not (ray or multiprocess) or smoke"

bench: $(STAMP)
	$(VENV)/bin/python -m bench.run --update-doc BENCHMARKS.md

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf runs data/demo
