# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create ./.venv on first use and install the package (with test extras) into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= demo-out

.PHONY: demo demo-quick test test-fast install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/neuroimagen demo --out $(OUT)

demo-quick: $(STAMP)
	$(BIN)/neuroimagen demo --quick --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m 'not slow'

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
