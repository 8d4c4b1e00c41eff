# All set-up lives here: a fresh machine needs only `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# The CPU wheel of torch first: a bare `torch` requirement would pull multi-GB CUDA builds.
	$(VENV)/bin/pip install --quiet "torch==2.13.0"
	# The ray extra too: the suite checks that `--backend ray` gives the local numbers.
	$(VENV)/bin/pip install --quiet -e ".[dev,dp,ray]"
	touch $(STAMP)

.PHONY: install demo test test-slow lint bench bench-membership
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/poisonlab demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_maml.py

# ART is a comparison, not a dependency: the `bench` extra installs it.
bench-membership: $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[bench]"
	$(PY) benchmarks/bench_shadow_batched.py
	$(PY) benchmarks/bench_membership_art.py
