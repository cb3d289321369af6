# Every target builds .venv from nothing when it is missing: a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-experiments test-examples docs quickstart nnx-example resnet-example bench lint fashion-mnist reproduce-fashion reproduce-retrain oneshot oneshot-fashion oneshot-obs gradual-obs rate-distortion speed-job clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all]"
	touch $(STAMP)

# The main job at small scale on sklearn digits: prune while training, quantize, fine-tune
# the codebooks, write the file; against Deep Compression's recipe (JSON and PNGs in results/).
demo: $(STAMP)
	$(PY) -m experiments.main_job

quickstart: $(STAMP)
	$(PY) examples/quickstart.py

# Flax NNX CNN: pruned(adam) under nnx.jit, whole units by group saliency, the cut, speed of cut vs masked.
nnx-example: $(STAMP)
	$(PY) examples/nnx_cnn.py

# ResNet-style CNN (BatchNorm, residual stages): channel groups from the traced graph, cut
# by Fisher saliency, shrunk vs masked accuracy, params, FLOPs and inference time.
resnet-example: $(STAMP)
	$(PY) examples/resnet_surgery.py

# The library suite: tests/ and the package's doctests (pyproject's testpaths) and the
# README's snippets, then the quickstart.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not docs_pages"
	$(PY) examples/quickstart.py

# Smoke runs of the experiments (tiny sizes) and the tests of their data loaders.
test-experiments: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile experiments/tests

# Smoke runs of the examples (each as a script, the long ones at their --quick size).
test-examples: $(STAMP)
	$(PY) -m pytest -q -n 2 examples/tests

# The docs pages' snippets, run, then the site from docs/ and the docstrings; any warning
# fails the build.
docs: $(STAMP)
	$(PY) -m pytest -q -n 2 -m docs_pages tests/test_docs.py
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check fisher_optax tests examples experiments benchmarks docs
	$(VENV)/bin/ruff format --check fisher_optax tests examples experiments benchmarks docs

# Fashion-MNIST from Debian's package (gzipped IDX files under /usr/share).
fashion-mnist:
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update && apt-get install -y dataset-fashion-mnist)
	dpkg -L dataset-fashion-mnist | grep -E 'idx.*\.gz$$' || true

# The main job on Fashion-MNIST: Caffe's LeNet-5 and LeNet-300-100, 3 seeds; two worker
# processes (one per core) share the phase cache; rewrites docs/results/main-fashion-mnist.md.
# The methods that fit in 90 minutes on 2 cores; the rest of main_job.METHODS add about half
# again (e.g. `make reproduce-fashion FASHION_METHODS=magnitude,two_stage,saliency`).
FASHION_METHODS ?= saliency,saliency_ecsq_plain,obs,obs_ecsq_plain,deep_compression,choi_uniform
reproduce-fashion: $(STAMP) fashion-mnist
	$(PY) -m experiments.main_job --dataset fashion-mnist --models lenet5,lenet-300-100 \
		--methods $(FASHION_METHODS) --jobs 2 --write-docs

# ECSQ with quantization-aware training against ECSQ alone, on LeNet-5 and LeNet-300-100
# (docs/results/main-fashion-retrain.md). Rounds of retraining after ECSQ add about half an
# hour: RETRAIN_METHODS=saliency,saliency_ecsq_plain,saliency_ecsq_retrain,saliency_ecsq_qat.
RETRAIN_METHODS ?= saliency,saliency_ecsq_plain,saliency_ecsq_qat
reproduce-retrain: $(STAMP) fashion-mnist
	$(PY) -m experiments.main_job --dataset fashion-mnist --models lenet5,lenet-300-100 \
		--methods $(RETRAIN_METHODS) --jobs 2 \
		--out results/retrain --docs-page docs/results/main-fashion-retrain.md --write-docs

# The paper's one-shot study (five criteria, pruning then a short fine-tune, four quantizers).
oneshot: $(STAMP)
	$(PY) -m experiments.reproduce

oneshot-fashion: $(STAMP) fashion-mnist
	$(PY) -m experiments.reproduce --dataset fashion-mnist --sparsities 50,80,90,95,98 --write-docs

# One-shot pruning, no retraining, Fashion-MNIST MLP 784-40-20-10 and LeNet-300-100, 3 seeds:
# block-Fisher OBS (fisher_optax.obs) against OBD from Adam's nu and magnitude, with their cost;
# rewrites each model's section of docs/results/oneshot-obs.md.
oneshot-obs: $(STAMP) fashion-mnist
	$(PY) -m experiments.oneshot_obs --model mlp-40-20 --write-docs
	$(PY) -m experiments.oneshot_obs --model lenet-300-100 --write-docs

# Pruned while training (pruned), Fashion-MNIST MLP 784-40-20-10 to 90-98%, 3 seeds: BlockOBS
# against OBD saliency and magnitude; rewrites the gradual section of docs/results/oneshot-obs.md.
gradual-obs: $(STAMP) fashion-mnist
	$(PY) -m experiments.gradual_obs --write-docs

# Accuracy against file size, LeNet-300-100 on Fashion-MNIST pruned to 94%: ECSQ (with and
# without Fisher) against k-means with allocate_bits and uniform quantization with entropy
# coding, and ECSQ after weight fine-tuning with and without rate_penalty; rewrites
# docs/results/rate-distortion.md.
rate-distortion: $(STAMP) fashion-mnist
	$(PY) -m experiments.rate_distortion --write-docs

# Structured pruning on Fashion-MNIST (ResNet, ViT): five criteria, the cut, fine-tuning, and
# the CPU inference speedup of the cut models; rewrites docs/results/structured.md.
speed-job: $(STAMP) fashion-mnist
	$(PY) -m experiments.structured_job --write-docs

clean:
	rm -rf $(VENV) results .pytest_cache docs/_build
