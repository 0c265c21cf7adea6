# realm-jax: `make run` (set up, then the main job) and `make test` (set up, then the test suite).
# Set-up creates .venv with a Python >= 3.12 found on this machine (scripts/find_python.sh) and installs
# the package with its test, notebook, server and default-model extras; it reruns only when pyproject.toml changes.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS := dev,model,notebooks,serve

.PHONY: setup run test test-all llama bench device-wheels gpu-aot clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/find_python.sh
	@python=$$(scripts/find_python.sh) || exit 1; \
	  if [ ! -x $(PY) ] || ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then \
	    echo "creating $(VENV) with $$python"; rm -rf $(VENV); "$$python" -m venv $(VENV) || exit 1; \
	  fi
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	@touch $(STAMP)

# The main job: generation with the embedded default model (gemma3-270m Q4_K_M).
run: setup
	$(VENV)/bin/realm-jax generate "Once upon a time" --max-new-tokens 64

test: setup
	$(PY) -m pytest -q

# The optional llama.cpp peer (compiles llama.cpp, ~6 minutes): enables the bit-exact reference tests.
llama: setup
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[llama]"

bench: setup
	$(PY) benchmarks/gguf_open.py

# Wheels of the dependencies a lent GPU machine lacks (it has jax, numpy, pytest, no network), for
# scripts/device_checks.sh; .whl/ is ignored by git and carried by the device tool.
device-wheels: setup
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl gguf tqdm jinja2 markupsafe tokenizers pyyaml

# XLA's GPU compile without a GPU (scripts/gpu_aot.py, tests/test_gpu_aot.py): a venv of its own with JAX's
# CUDA plugin at the installed jaxlib's version, pip's ptxas and, apart in its tools/, cuobjdump (for
# `kernel_report.py --compiler xla`): ~330 MB of downloads. Not in .venv: there the plugin would make every
# JAX start look for a GPU.
AOT := .venv-gpu-aot
gpu-aot: setup
	@jax=$$($(PY) -c 'import jax; print(jax.__version__)') && jaxlib=$$($(PY) -c 'import jaxlib; print(jaxlib.__version__)') \
	  && python=$$(scripts/find_python.sh) || exit 1; \
	  [ -x $(AOT)/bin/python ] || "$$python" -m venv $(AOT) || exit 1; \
	  $(AOT)/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]" "jax==$$jax" "jaxlib==$$jaxlib" \
	  && $(AOT)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "jax-cuda12-plugin==$$jaxlib" \
	    "jax-cuda12-pjrt==$$jaxlib" nvidia-cuda-nvcc-cu12 \
	  && $(AOT)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target $(AOT)/tools \
	    nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm

clean:
	rm -rf $(VENV) $(AOT) .pytest_cache
