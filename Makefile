# Two entry points: `make demo` (whole system end to end on generated data) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml tools/setup_env.sh
	PYTHON=$(PYTHON) bash tools/setup_env.sh $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py --out demo_run

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo_run
