# The two commands the README names: `make demo` and `make test`. Both set up everything first.
VENV ?= .venv
KD := $(VENV)/bin/kd

.PHONY: setup demo test
setup:
	@bash scripts/setup.sh $(VENV)

demo: setup
	$(KD) demo

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
