# The two commands of the README: `make run` (set up + main job) and `make test` (set up + tests).
# Both start from nothing: a venv, torch==2.13.0 first (the CPU wheel; any other request pulls a
# multi-GB CUDA build), then the project with its test extra.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/kiln up --local --exit-after 0

test: $(STAMP)
	$(BIN)/ruff check kilnlm cluster actors tests bench protos
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check kilnlm cluster actors tests bench protos
	$(BIN)/ruff format --check kilnlm cluster actors tests bench protos

clean:
	rm -rf $(VENV) runs .pytest_cache
