# The two commands of the README: `make run` (set up + main job) and `make test` (set up + tests).
# Both start from nothing: a venv, torch==2.13.0 first (the CPU wheel; any other request pulls a
# multi-GB CUDA build), then the project with its test extra.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test lint bench clean posttrain rl

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/kiln up --local --exit-after 0

# Post-training on the embedded defaults, chained through each command's export:
# pretrain (kiln train) -> SFT (kiln finetune) -> reward model -> DPO, each printing its figures.
POST := runs/posttrain
posttrain: $(STAMP)
	rm -rf $(POST) && mkdir -p $(POST)
	$(BIN)/kiln train --preset test-1m --block-size 256 --max-steps 300 --checkpoint-every 300 \
	    --corpus-max-bytes 2000000 --storage-path $(POST) --name pretrain --no-progress \
	    --json > $(POST)/pretrain.json && cat $(POST)/pretrain.json
	$(BIN)/kiln finetune --from "$$($(BIN)/python -c "import json; \
	    print(json.load(open('$(POST)/pretrain.json'))['exports'][-1])")" \
	    --out $(POST)/sft --storage-path $(POST) --no-progress
	$(BIN)/kiln reward train --from $(POST)/sft --out $(POST)/reward --storage-path $(POST) --no-progress
	$(BIN)/kiln dpo --from $(POST)/sft --out $(POST)/dpo --storage-path $(POST) --no-progress

# Online RL on post-training I's results: the SFT export as pi0 (and KL reference), held-out
# prompts of the embedded instruction set, three beta (kiln rl --defaults; figures in
# docs/post-training.md). The reward is a reward model trained on the SFT policy's own replies
# ranked by ROUGE-L to the reference ($(POST)/reward-onpolicy, built by kiln rl --defaults when
# missing, a few minutes). Runs `make posttrain` first if its exports are missing.
rl: $(STAMP) | $(POST)/reward/manifest.json
	rm -rf $(POST)/rl
	$(BIN)/kiln rl --defaults --from-dir $(POST) --out $(POST)/rl

$(POST)/reward/manifest.json:
	$(MAKE) posttrain

test: $(STAMP)
	$(BIN)/ruff check kilnlm cluster actors tests bench protos
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check kilnlm cluster actors tests bench protos
	$(BIN)/ruff format --check kilnlm cluster actors tests bench protos

clean:
	rm -rf $(VENV) runs .pytest_cache
