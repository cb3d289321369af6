# Every target builds .venv from nothing when it is missing: a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test quickstart nnx-example resnet-example bench lint fashion-mnist reproduce-fashion oneshot oneshot-fashion clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all]"
	touch $(STAMP)

# The main job at small scale on sklearn digits: prune while training, quantize, fine-tune
# the codebooks, write the file; against Deep Compression's recipe (JSON and PNGs in results/).
demo: $(STAMP)
	$(PY) examples/main_job.py

quickstart: $(STAMP)
	$(PY) examples/quickstart.py

# Flax NNX CNN: pruned(adam) under nnx.jit, unit pruning, surgery, speed of shrunk vs masked.
nnx-example: $(STAMP)
	$(PY) examples/nnx_cnn.py

# ResNet-style CNN (BatchNorm, residual stages): channel groups from the traced graph, cut
# by Fisher saliency, shrunk vs masked accuracy, params, FLOPs and inference time.
resnet-example: $(STAMP)
	$(PY) examples/resnet_surgery.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile
	$(PY) examples/quickstart.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check fisher_optax tests examples benchmarks
	$(VENV)/bin/ruff format --check fisher_optax tests examples benchmarks

# Fashion-MNIST from Debian's package (gzipped IDX files under /usr/share).
fashion-mnist:
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update && apt-get install -y dataset-fashion-mnist)
	dpkg -L dataset-fashion-mnist | grep -E 'idx.*\.gz$$' || true

# The main job on Fashion-MNIST: Caffe's LeNet-5 and LeNet-300-100, 3 seeds (the README gives
# its measured time); two worker processes (one per core) share the phase cache; rewrites
# the README's section from the run.
reproduce-fashion: $(STAMP) fashion-mnist
	$(PY) examples/main_job.py --dataset fashion-mnist --jobs 2 --write-readme

# The paper's one-shot study (five criteria, pruning then a short fine-tune, four quantizers).
oneshot: $(STAMP)
	$(PY) examples/reproduce.py

oneshot-fashion: $(STAMP) fashion-mnist
	$(PY) examples/reproduce.py --dataset fashion-mnist --sparsities 50,80,90,95,98 --write-readme

clean:
	rm -rf $(VENV) results .pytest_cache
