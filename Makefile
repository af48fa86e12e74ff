# The two commands the README names: `make demo` and `make test`. Both set up everything first.
VENV ?= .venv
KD := $(VENV)/bin/kd

.PHONY: setup demo test test-fast
setup:
	@bash scripts/setup.sh $(VENV)

demo:  # what kd runs on, without the test extra (make test adds it)
	@KD_EXTRAS= bash scripts/setup.sh $(VENV)
	$(KD) demo

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# development: the tests that start no Ray and take under ~20 s each (the full suite is `make test`)
test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow and not ray" $(PYTEST_ARGS)
