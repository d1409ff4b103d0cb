# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create the virtual environment in .venv and install the project into it first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,export]'
	touch $@

demo: install
	$(VENV)/bin/distill demo

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy
