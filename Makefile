# kvp-mlx: set-up, demo, tests. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_MODEL ?= models/random-demo
DEMO_PROMPT_FILE ?= $(shell $(PYTHON) -c 'import textwrap; print(textwrap.__file__)')

.PHONY: setup setup-bench blas demo demo-model random-demo test toyworld accuracy bench bench-full bench-smoke clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Linux: MLX's CPU wheel ships a slow reference BLAS; kvp_mlx loads Debian's OpenBLAS by itself.
blas:
	@if [ "$$(uname -s)" = Linux ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libopenblas0-pthread) \
	      || echo "warning: could not install libopenblas0-pthread; MLX will run with its slow reference BLAS"; \
	  else echo "warning: install OpenBLAS (libopenblas) for fast float32 on the CPU"; fi; \
	fi

setup: $(PY) blas
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"

demo-model: setup
	@[ -f $(DEMO_MODEL)/kvp_config.json ] || $(PY) -m kvp_mlx.testing $(DEMO_MODEL)

# The main job: the embedded demo model (trained in the toy world, KVP-C) generates with KV
# Prediction, side by side with plain base prefill: both TTFTs and whether the first tokens agree.
demo: setup
	$(VENV)/bin/kvp-mlx generate --prompt "def fibonacci(n):" --max-tokens 60
	head -c 4000 $(DEMO_PROMPT_FILE) | $(VENV)/bin/kvp-mlx generate --prompt - --compare --max-tokens 30

# A random-weight pair (no training needed) for quick experiments: models/random-demo.
random-demo: demo-model
	head -c 6000 $(DEMO_PROMPT_FILE) | $(VENV)/bin/kvp-mlx generate --model $(DEMO_MODEL) --prompt - --compare --max-tokens 20

# Lint (ruff) and type check (mypy) first, then the test suite: what CI runs through .ci/run.
test: setup
	VENV=$(abspath $(VENV)) bash .ci/lint
	$(PY) -m pytest -q tests

setup-bench: setup
	$(PY) -m pip install -q -e ".[test,bench]"

# Rebuild the toy world from scratch (corpus, tokenizer, base/aux pretraining, KVP-C, KVP-LP, baselines)
# and export the KVP-C model as the embedded demo (kvp_mlx/default_model), checked against its source
# before it replaces the old one. About an hour on 2 cores.
toyworld: setup-bench
	$(PY) -m bench.toyworld --out models/toyworld

# Teacher-forced accuracy of base / kvp-C / kvp-LP / aux-only / LP-only on held-out stdlib and HumanEval.
accuracy: setup-bench
	$(PY) -m bench.accuracy --toyworld models/toyworld --out bench/results/toyworld

# The lab's TTFT benchmark (random-weight OpenELM pairs; results in bench/results/<date>-<host>/).
bench: setup-bench
	$(PY) -m bench.ttft --profile quick

bench-full: setup-bench
	$(PY) -m bench.ttft --profile full

# Every lab command once in its smallest form (outputs in a temporary folder): the lab still runs.
bench-smoke: setup-bench
	PY=$(PY) bash bench/smoke.sh

clean:
	rm -rf $(VENV) models build *.egg-info
