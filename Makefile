# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create ./.venv on first use and install the package (with test extras) into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= demo-out

.PHONY: demo demo-quick test test-fast test-avx2 lint install clean constraints

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]' -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/neuroimagen demo --out $(OUT)

demo-quick: $(STAMP)
	$(BIN)/neuroimagen demo --quick --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

# The precision/layout tests again on a simulated AVX2-only CPU (no AVX-512, no native bf16 or AMX), whatever
# this machine has: a submission must not pass only on a newer CPU. ONEDNN_MAX_CPU_ISA limits oneDNN's kernels,
# ATEN_CPU_CAPABILITY ATen's vectorised ones.
test-avx2: $(STAMP)
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest -m isa

# Imports at the top of every module (the arrows between modules stay visible), pyflakes, sorted imports.
lint: $(STAMP)
	$(BIN)/ruff check neuroimagen jobs tests bench

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m 'not slow'

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Pin the current environment's versions (after a deliberate upgrade; then regenerate the reference results).
constraints: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e\|^pip==\|^setuptools==\|^wheel=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
