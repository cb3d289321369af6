"""The main job: prune while training, quantize, fine-tune the codebooks, write the file.

For each model and seed, in one run, with one budget of steps for every method:

1. **Dense.** Train the network of ``experiments/models.py`` with ``optax.adam`` (cosine decay).
2. **Prune while training** with :func:`fisher_optax.pruned`, continuing the dense run's
   Adam state (so the Fisher read from its ``nu`` is there from the first mask update). The
   target rises as a staircase through the sparsity levels: a ramp of ``ramp`` steps to the
   next level, ``hold`` steps at it, a checkpoint at the end of each hold. The criteria:

   - ``magnitude``: :math:`|w|`, global;
   - ``two_stage``: the paper's two stages (half the target by :math:`|w|`, the rest by
     the Fisher), global;
   - ``saliency``: OBD's :math:`\\tfrac12 F w^2`, global;
   - ``obs``: block Optimal Brain Surgeon (:class:`fisher_optax.obs.BlockOBS`): the block
     empirical Fisher of the last mini-batch gradients selects the weights and moves the
     survivors to compensate, global;
   - ``deep_compression``: Deep Compression's recipe (Han et al. 2016) as the baseline:
     magnitude pruning with retraining at per-layer rates proportional to their Table 3
     (each level scales them together), then k-means with linear init, unweighted, at
     their bit widths (8 conv / 5 fc on LeNet-5, 6 on LeNet-300-100) and narrower ones.

3. **Quantize** the highest levels whose pruned accuracy stays near dense. Each reported
   method (``METHODS``) is a pruning run and a quantizer:

   - ``kmeans`` (the Fisher runs): :func:`fisher_optax.allocate_bits` at several average
     widths, then Fisher-weighted k-means;
   - ``ecsq`` (``saliency_ecsq``): :func:`fisher_optax.quantize_to_target`,
     entropy-constrained and Fisher-weighted, at the sizes of the same level's k-means files
     and below, a weight quantized to 0 where that pays; ``ecsq_plain``
     (``saliency_ecsq_plain``, ``obs_ecsq_plain``): the same with every weight weighed 1;
   - ``fisher_step`` (``saliency_step``): ``quantize_to_target(method="fisher_step")``, a
     grid through 0 per layer whose step falls as one over the root of the layer's mean
     Fisher, at ECSQ's targets;
   - ``ecsq_retrain`` (``saliency_ecsq_retrain``): ``ecsq_plain``, then rounds of
     retraining the weights it keeps (its zeros held at 0) and quantizing again at the same
     size (``Config.retrain_steps``, ``retrain_rounds``);
   - ``ecsq_qat`` (``saliency_ecsq_qat``): ``ecsq_plain``, then quantization-aware
     training with its codebooks and zeros held (:func:`fisher_optax.fake_quantize`, the
     weights trained through the straight-through estimator, ``Config.qat_steps``), coded
     with the nearest entries (:func:`fisher_optax.reassign`);
   - ``deep_compression``: the recipe's k-means;
   - ``uniform`` (``choi_uniform``, the second baseline): Choi et al. 2017's uniform
     quantization with entropy coding, on the recipe's pruned models.

   Then **fine-tune the codebooks** with :func:`fisher_optax.share_codebooks` (the same
   steps for every method) and **write the file** with :func:`fisher_optax.save_compressed`
   (entropy coded). The accuracy is that of the model loaded back from the file; the ratio
   is float32 dense bytes over file bytes; the split of the file (positions, codes,
   codebooks, raw leaves) is recorded.
4. **Report** (``experiments/main_report.py``): per method the largest ratio within 1.0 point
   of that seed's dense accuracy (mean ± std over seeds), accuracy against sparsity and
   against file size (PNG), every number in JSON, and the docs results page
   (``docs/results/main-<dataset>.md``, with ``--write-docs``).

Every phase is cached under ``--cache-dir`` by a hash of what it depends on, the code
included (``experiments.versions.code_version``), so a rerun recomputes only what changed
and a report never mixes phases of two versions of the code.

Run from the repository root:
      python -m experiments.main_job                      # digits (`make demo`)
      python -m experiments.main_job --dataset fashion-mnist --models lenet5,lenet-300-100
      python -m experiments.main_job --quick              # tiny, for CI
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tqdm.auto import tqdm

import fisher_optax
from experiments import datasets, main_report, models, report
from experiments.versions import code_version

REPO = Path(__file__).resolve().parents[1]
# The pruning runs, and each reported method: its pruning run and its quantizer.
PRUNING = ("magnitude", "two_stage", "saliency", "obs", "deep_compression")
METHODS = {
    "magnitude": ("magnitude", "kmeans"),
    "two_stage": ("two_stage", "kmeans"),
    "saliency": ("saliency", "kmeans"),
    "saliency_ecsq": ("saliency", "ecsq"),
    "saliency_ecsq_plain": ("saliency", "ecsq_plain"),
    "saliency_ecsq_retrain": ("saliency", "ecsq_retrain"),
    "saliency_ecsq_qat": ("saliency", "ecsq_qat"),
    "saliency_step": ("saliency", "fisher_step"),
    "obs": ("obs", "kmeans"),
    "obs_ecsq_plain": ("obs", "ecsq_plain"),
    "deep_compression": ("deep_compression", "deep_compression"),
    "choi_uniform": ("deep_compression", "uniform"),
}
BASELINES = ("deep_compression", "choi_uniform")
# The quantizers set by a file size: their targets are the sizes of the same level's k-means
# files (so their pruning run must have its k-means method too) and fractions of them.
SIZE_TARGETED = ("ecsq", "ecsq_plain", "fisher_step", "ecsq_retrain", "ecsq_qat")
# Deep Compression's Table 3 (LeNet-5) and Table 2 (LeNet-300-100): the share of each
# layer's weights pruned, and the bits of each layer's codebook.
HAN_RATES = {
    "cnn": {"conv1": 0.34, "conv2": 0.88, "fc1": 0.92, "fc2": 0.81},
    "mlp": {"fc1": 0.92, "fc2": 0.91, "fc3": 0.74},
}
HAN_BITS = {"cnn": {"conv": 8, "fc": 5}, "mlp": {"conv": 6, "fc": 6}}
BIT_WIDTHS = (8, 7, 6, 5, 4, 3, 2)  # what allocate_bits picks each leaf's width from
PRNG_IMPL = "rbg"  # as experiments/reproduce.py: threefry compiles slowly on XLA:CPU


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str
    model: str
    seed: int
    dense_steps: int
    batch_size: int
    lr: float
    levels: tuple[float, ...]
    ramp: int
    hold: int
    update_every: int
    prune_lr: float
    bits: tuple[float, ...]  # average bits of the Fisher methods
    dc_fc_bits: tuple[int, ...]  # Deep Compression's fc widths (conv: +3, at most 8)
    ft_steps: int
    ft_lr: float
    quant_levels: int  # how many of the highest near-dense levels are quantized
    quant_margin: float  # "near dense": pruned accuracy >= dense - margin (points)
    eval_batch: int = 1000
    # allocate_bits' entry_bits for the Fisher methods: the budget pays for each codebook
    # entry as the file does (about 40 bits: a float32 and its share of the coder's table).
    # Measured on LeNet-5 Fashion seed 0 at 95% and 97% (--entry-bits 0 against the preset):
    # files 7-9% smaller at the same settings, accuracy within 0.2 points (entry_bits 0 gave
    # small leaves 8 bits for free).
    entry_bits: float = 40.0
    # Block OBS while training (fisher_optax.obs.BlockOBS): blocks of 64 weights, the last 64
    # mini-batch gradients, damping 1e-5 (chosen on a held-out split by
    # experiments/gradual_obs.py). A mask update costs about as much as 120 steps on LeNet-5
    # (3.3 s against 27.5 ms, this machine), so it updates its mask every 100 steps, not 25.
    obs_block_size: int = 64
    obs_num_grads: int = 64
    obs_damping: float = 1e-5
    obs_update_every: int = 100
    # ECSQ targets per quantized level: the sizes of that level's ``ecsq_paired`` smallest
    # k-means files (paired comparisons), and these fractions of the smallest (0.7 alone
    # lost 6-10 points on LeNet-5 Fashion: 0.85 samples the frontier between).
    ecsq_paired: int = 2
    ecsq_fractions: tuple[float, ...] = (0.85, 0.7)
    # Choi et al.'s uniform quantization with entropy coding: one width for every kernel.
    uniform_bits: tuple[int, ...] = (6, 5, 4)
    # Biases are coded like the kernels, by each method's own rule (allocate_bits' widths,
    # ECSQ's one price of a bit, the recipe's layer width, Choi's one width); True stores
    # them raw (quantize's default). Raw, LeNet-5's 580 biases are 2,428 of a 14.1 KB file.
    # Measured on LeNet-5 Fashion seed 0, OBD saliency at 97%, 3 bits average, after the
    # codebook fine-tuning: coded 12,154 B at 89.31%, raw 14,136 B at 89.24%.
    raw_biases: bool = False
    # ecsq_retrain: ECSQ (every weight weighed 1), then `retrain_rounds` times: retrain the
    # weights it did not quantize to 0 for `retrain_steps` Adam steps (from prune_lr, cosine
    # to a tenth; the zeros held by keep_pruned) and quantize again at the same size.
    # Measured on LeNet-5 Fashion seed 0 at 97%, 10.3 KB: 87.58% with no retraining, 88.97%
    # after one round of 300 steps, 89.47% after two; at 8.5 KB 86.11, 87.79, 88.57, and
    # 88.75% after three.
    retrain_steps: int = 300
    retrain_rounds: int = 2
    # ecsq_qat: ECSQ (every weight weighed 1), then `qat_steps` Adam steps (from prune_lr,
    # cosine to a tenth) on a loss computed with fake_quantize: the model runs on the
    # weights moved to their nearest entries of ECSQ's codebooks, ECSQ's zeros held, and the
    # gradient passes straight through to the float weights; then reassign codes them.
    # Measured on LeNet-5 Fashion seed 0 at 97%, ECSQ at 8.5 KB (86.16%): 89.57% at 8.8 KB
    # after 900 steps, 89.52% after three rounds of 300 (the codebooks kept); quantizing
    # the trained floats again by ECSQ instead lost 1.5-5 points of that. 2500 steps did
    # better on LeNet-5 (see its preset). Distillation from the dense model did not pay
    # (seed 0, 97%, 7.6 KB target, 2500 steps: 89.59% without; the dense model's soft labels
    # alone 89.46%, half of them at temperature 2 89.50%).
    qat_steps: int = 900


PRESETS = {
    "digits-cnn": dict(
        dense_steps=1500,
        batch_size=64,
        lr=2e-3,
        levels=(0.5, 0.7, 0.8, 0.9, 0.95),
        ramp=150,
        hold=150,
        update_every=15,
        prune_lr=1e-3,
        bits=(3, 3.5, 4),
        dc_fc_bits=(5, 4, 3),
        ft_steps=100,
        ft_lr=1e-4,
        quant_levels=1,
        quant_margin=1.5,
        eval_batch=512,
        # Measured (--entry-bits 40): this 13.7k-parameter CNN's small conv layers went to
        # 2-3 bits and lost up to 7.5 points after quantization (seed 1, 90% sparse, 3 bits
        # avg: 90.81% against 98.33% pruned); its codebooks cost as much as its codes.
        entry_bits=0.0,
    ),
    "lenet5": dict(
        dense_steps=4000,
        batch_size=128,
        lr=1e-3,
        levels=(0.8, 0.9, 0.93, 0.95, 0.97, 0.98),
        ramp=300,
        hold=300,
        update_every=25,
        prune_lr=5e-4,
        bits=(3, 3.5, 4),
        dc_fc_bits=(5, 4, 3),
        ft_steps=200,
        ft_lr=5e-5,
        quant_levels=2,
        quant_margin=1.25,
        # Measured on the 97% models of seeds 0-2 (trained on the processor of the main
        # results page's run; XLA:CPU trains other models on other processors) at an 8.45 KB
        # target: 2500 steps of quantization-aware training held 89.93-90.17% (8.85-8.89 KB)
        # where 900 held 89.66% (8.77 KB, seed 0); at 7.6 KB 89.56-89.59%. The crossing of
        # the point lies between 0.7 and 0.6 of the smallest k-means file.
        qat_steps=2500,
        ecsq_fractions=(0.85, 0.7, 0.6),
    ),
    "lenet-300-100": dict(
        dense_steps=6000,
        batch_size=128,
        lr=1e-3,
        levels=(0.8, 0.9, 0.93, 0.95, 0.97, 0.98),
        ramp=400,
        hold=400,
        update_every=25,
        prune_lr=5e-4,
        bits=(3, 3.5, 4),
        dc_fc_bits=(6, 5, 4, 3),
        ft_steps=300,
        ft_lr=5e-5,
        quant_levels=2,
        quant_margin=1.25,
    ),
}
QUICK = dict(
    dense_steps=60,
    levels=(0.5, 0.8),
    ramp=10,
    hold=10,
    update_every=5,
    bits=(3,),
    dc_fc_bits=(4,),
    ft_steps=5,
    quant_levels=1,
    quant_margin=100.0,
    obs_num_grads=8,
    obs_update_every=5,
    ecsq_fractions=(0.7,),
    uniform_bits=(4,),
    retrain_steps=5,
    retrain_rounds=1,
    qat_steps=5,
)


# ---------------------------------------------------------------------------------------------
# Cache: every phase's arrays in one .npz (flattened dict paths) and its numbers in JSON.


CODE_VERSION = code_version()


def _key(*parts: Any) -> str:
    text = json.dumps([CODE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        *heads, last = path.split("/")
        node = out
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = jnp.asarray(v)
    return out


class Cache:
    """``get(name, key)`` / ``put(name, key, trees, info)``; no directory means no cache."""

    def __init__(self, root: str | None):
        self.root = Path(root) if root else None

    def _path(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key}"

    def get(self, name: str, key: str) -> tuple[dict, dict] | None:
        if self.root is None or not self._path(name, key).with_suffix(".json").exists():
            return None
        info = json.loads(self._path(name, key).with_suffix(".json").read_text())
        with np.load(self._path(name, key).with_suffix(".npz")) as z:
            flat = {k: z[k] for k in z.files}
        trees = {
            n: _unflatten({k[len(n) + 1 :]: v for k, v in flat.items() if k.startswith(n + "/")})
            for n in info["trees"]
        }
        return trees, info["info"]

    def put(self, name: str, key: str, trees: dict, info: dict) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        flat = {f"{n}/{k}": v for n, t in trees.items() for k, v in _flatten(t).items()}
        tmp = self._path(name, key).with_suffix(".tmp.npz")
        np.savez(tmp, **flat)
        os.replace(tmp, self._path(name, key).with_suffix(".npz"))
        payload = json.dumps({"trees": sorted(trees), "info": info})
        self._path(name, key).with_suffix(".json").write_text(payload)


# ---------------------------------------------------------------------------------------------
# Training. Data, masks and learning rates are arguments; each function compiles once per model.


def lr_schedule(cfg: Config) -> optax.Schedule:
    """Cosine decay to a tenth over the dense steps, then over each pruning level again."""
    period = cfg.ramp + cfg.hold

    def lr(count):
        dense = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * count / cfg.dense_steps)))
        t = jnp.maximum(count - cfg.dense_steps, 0) % period
        prune = cfg.prune_lr * (0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * t / period)))
        return jnp.where(count < cfg.dense_steps, dense, prune)

    return lr


def _scan_steps(opt, loss, params, opt_state, key, x, y, steps, batch_size):
    def step(carry, k):
        params, opt_state = carry
        idx = jax.random.randint(k, (batch_size,), 0, x.shape[0])
        value, grads = jax.value_and_grad(loss)(params, x[idx], y[idx])
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    (params, opt_state), values = lax.scan(step, (params, opt_state), jax.random.split(key, steps))
    return params, opt_state, values.mean()


def make_trainer(opt, model, steps: int, batch_size: int):
    """A jitted ``steps`` steps of ``opt`` on random batches of ``(x, y)``."""
    loss = partial(models.loss_fn, model)
    return jax.jit(partial(_scan_steps, opt, loss, steps=steps, batch_size=batch_size))


@partial(jax.jit, static_argnames=("model", "batch"))
def accuracy(params, x, y, *, model, batch):
    pad = -x.shape[0] % batch
    xs = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(
        -1, batch, *x.shape[1:]
    )
    ys = jnp.concatenate([y, jnp.full((pad,), -1, y.dtype)]).reshape(-1, batch)
    hits = lax.map(
        lambda b: jnp.sum(jnp.argmax(models.apply(model, params, b[0]), -1) == b[1]), (xs, ys)
    )
    return hits.sum() / x.shape[0]


def evaluate(params, data, cfg: Config, model) -> float:
    x, y = data.x_test, data.y_test
    return 100.0 * float(accuracy(params, x, y, model=model, batch=min(cfg.eval_batch, x.shape[0])))


def model_kind(params: dict) -> str:
    return "cnn" if any(k.startswith("conv") for k in params) else "mlp"


def han_targets(params: dict) -> tuple[dict, float]:
    """Per-leaf final targets proportional to Han et al.'s rates, and the progress of Table 3.

    ``pruned(sparsity=targets)`` prunes leaf ``l`` to ``targets[l] * progress``. The targets
    are the rates scaled so that the most pruned layer ends at 0.995; Table 3 itself is the
    returned progress. Leaves other than kernels are not pruned (0).
    """
    rates = HAN_RATES[model_kind(params)]
    scale = 0.995 / max(rates.values())
    targets = {
        layer: {name: (rates[layer] * scale if name == "kernel" else 0.0) for name in leaves}
        for layer, leaves in params.items()
    }
    return targets, 1.0 / scale


def overall_han(params: dict) -> float:
    """Table 3's overall sparsity over this model's kernels."""
    rates = HAN_RATES[model_kind(params)]
    n = {k: v["kernel"].size for k, v in params.items()}
    return sum(rates[k] * n[k] for k in n) / sum(n.values())


def staircase(values: tuple[float, ...], ramp: int, hold: int) -> optax.Schedule:
    """0 at step 0, then per level: a linear ramp of ``ramp`` steps, ``hold`` steps flat."""
    xs, ys, t = [0.0], [0.0], 0
    for v in values:
        xs += [t + ramp, t + ramp + hold]
        ys += [v, v]
        t += ramp + hold
    xs_a, ys_a = jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32)
    return lambda count: jnp.interp(jnp.asarray(count, jnp.float32), xs_a, ys_a)


def pruning_optimizer(method: str, cfg: Config, params: dict):
    """The ``pruned(adam)`` of ``method`` and its per-level targets."""
    adam = optax.adam(lr_schedule(cfg))
    if method == "deep_compression":
        targets, table3 = han_targets(params)
        # The same overall levels as the other criteria: level s is progress s / s_han * table3.
        s_han = overall_han(params)
        progress = tuple(min(1.0, s / s_han * table3) for s in cfg.levels)
        opt = fisher_optax.pruned(
            adam,
            staircase(progress, cfg.ramp, cfg.hold),
            criterion="magnitude",
            method="one_stage",
            sparsity=targets,
            update_every=cfg.update_every,
        )
        return opt
    if method == "obs":
        surgeon = fisher_optax.obs.BlockOBS(
            block_size=cfg.obs_block_size, num_grads=cfg.obs_num_grads, damping=cfg.obs_damping
        )
        return fisher_optax.pruned(
            adam,
            staircase(cfg.levels, cfg.ramp, cfg.hold),
            criterion=surgeon,
            method="one_stage",
            update_every=cfg.obs_update_every,
        )
    criterion = {"magnitude": "magnitude", "two_stage": "fisher", "saliency": "saliency"}[method]
    return fisher_optax.pruned(
        adam,
        staircase(cfg.levels, cfg.ramp, cfg.hold),
        criterion=criterion,
        method="two_stage" if method == "two_stage" else "one_stage",
        update_every=cfg.update_every,
    )


# ---------------------------------------------------------------------------------------------
# Phases


DENSE_FIELDS = ("dataset", "model", "seed", "dense_steps", "batch_size", "lr")
PRUNE_FIELDS = (*DENSE_FIELDS, "levels", "ramp", "hold", "update_every", "prune_lr")
OBS_FIELDS = ("obs_block_size", "obs_num_grads", "obs_damping", "obs_update_every")


def prune_fields(cfg: Config, method: str) -> dict:
    """What a pruning run of ``method`` depends on (its cache key)."""
    return _fields(cfg, (*PRUNE_FIELDS, *(OBS_FIELDS if method == "obs" else ())))


def _fields(cfg: Config, names: tuple[str, ...]) -> dict:
    return {n: getattr(cfg, n) for n in names}


def dense_phase(cfg, data, model, cache, key):
    ck = _key("dense", _fields(cfg, DENSE_FIELDS))
    hit = cache.get("dense", ck)
    if hit is not None:
        trees, info = hit
        return trees["params"], trees["nu"], trees["mu"], info
    k_init, k_train = jax.random.split(key)
    params = model.init(k_init, data.x_train.shape[1:])
    opt = optax.adam(lr_schedule(cfg))
    opt_state = opt.init(params)
    chunk = 100 if cfg.dense_steps >= 100 else cfg.dense_steps
    train = make_trainer(opt, model, chunk, cfg.batch_size)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    t0 = time.perf_counter()
    keys = jax.random.split(k_train, cfg.dense_steps // chunk)
    for k in tqdm(keys, desc=f"{cfg.model} seed {cfg.seed}: dense", leave=False):
        params, opt_state, loss = train(params, opt_state, k, x, y)
    adam_state = opt_state[0]
    info = {
        "accuracy": evaluate(params, data, cfg, model),
        "loss": float(loss),
        "seconds": time.perf_counter() - t0,
        "n_params": models.n_params(params),
    }
    cache.put("dense", ck, {"params": params, "nu": adam_state.nu, "mu": adam_state.mu}, info)
    return params, adam_state.nu, adam_state.mu, info


def cached_levels(trees: dict, info: dict) -> list[dict]:
    """The levels of a staircase as :func:`prune_phase` stores them: per level its params,
    bool mask, Fisher and the level's record."""
    return [
        {
            "params": trees[f"params{i}"],
            "mask": jax.tree.map(lambda m: m.astype(bool), trees[f"mask{i}"]),
            "fisher": trees[f"fisher{i}"],
            **lvl,
        }
        for i, lvl in enumerate(info["levels"])
    ]


def prune_phase(method, cfg, data, model, cache, key, dense):
    """The staircase run of ``method``: per level its params, mask, Fisher and accuracy."""
    params, nu, mu, dense_info = dense
    ck = _key("prune", prune_fields(cfg, method), method, dense_info["accuracy"])
    hit = cache.get(f"prune-{method}", ck)
    if hit is not None:
        return cached_levels(*hit)
    opt = pruning_optimizer(method, cfg, params)
    state = opt.init(params)
    # Continue the dense run's Adam (its moments and count: the schedule and the Fisher go on).
    inner = state.inner_state
    adam = inner[0]._replace(count=jnp.asarray(cfg.dense_steps, jnp.int32), mu=mu, nu=nu)
    state = state._replace(inner_state=(adam, *inner[1:]))
    train = make_trainer(opt, model, cfg.ramp + cfg.hold, cfg.batch_size)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    out, t0 = [], time.perf_counter()
    for i, k in enumerate(
        tqdm(
            jax.random.split(key, len(cfg.levels)),
            desc=f"{cfg.model} seed {cfg.seed}: prune {method}",
            leave=False,
        )
    ):
        params, state, loss = train(params, state, k, x, y)
        fisher = fisher_optax.fisher_from_state(state.inner_state, batch_size=cfg.batch_size)
        report = fisher_optax.sparsity_report(state.mask)
        out.append(
            {
                "params": params,
                "mask": state.mask,
                "fisher": fisher,
                "level": cfg.levels[i],
                "sparsity": float(report.sparsity),
                "accuracy": evaluate(params, data, cfg, model),
                "loss": float(loss),
            }
        )
    seconds = time.perf_counter() - t0
    trees = {}
    for i, lvl in enumerate(out):
        trees.update(
            {f"params{i}": lvl["params"], f"mask{i}": lvl["mask"], f"fisher{i}": lvl["fisher"]}
        )
    levels = [
        {k: v for k, v in lvl.items() if k not in ("params", "mask", "fisher")} for lvl in out
    ]
    for lvl in levels:
        lvl["seconds"] = seconds / len(levels)
    cache.put(f"prune-{method}", ck, trees, {"levels": levels})
    for lvl, meta in zip(out, levels, strict=True):
        lvl.update(meta)
    return out


def quant_settings(quantizer, cfg, params, sizes=()):
    """Per setting of ``quantizer``: (label, kwargs of :func:`quantized`). ``sizes``: the
    file sizes of the level's k-means files, which place ECSQ's targets."""
    if quantizer == "kmeans":
        return [
            (
                f"{b:g} bits avg",
                {"average_bits": b, "granularity": "layer", "entry_bits": cfg.entry_bits},
            )
            for b in cfg.bits
        ]
    if quantizer in SIZE_TARGETED:
        targets = sorted(sizes)[: cfg.ecsq_paired] + [f * min(sizes) for f in cfg.ecsq_fractions]
        name = "steps" if quantizer == "fisher_step" else "ECSQ"
        return [(f"{name} {t / 1024:.1f} KiB", {"size_bytes": round(t)}) for t in targets]
    if quantizer == "uniform":
        return [(f"{b} bits uniform", {"bits": b}) for b in cfg.uniform_bits]
    conv_extra = 3 if model_kind(params) == "cnn" else 0
    return [
        (
            f"{min(8, b + conv_extra)}/{b} bits" if conv_extra else f"{b} bits",
            {"conv": min(8, b + conv_extra), "fc": b},
        )
        for b in cfg.dc_fc_bits
    ]


def _float_leaf(path, leaf) -> bool:
    return bool(jnp.issubdtype(leaf.dtype, jnp.floating))


def quantized(quantizer, setting, level, *, raw_biases: bool = False):
    params, mask, fisher = level["params"], level["mask"], level["fisher"]
    # Every float leaf (kernels and biases), or quantize's default: the kernels only.
    coded = None if raw_biases else _float_leaf
    if quantizer == "deep_compression":
        bits = {
            layer: {
                name: np.where(
                    np.asarray(mask[layer][name]) & (name == "kernel" or not raw_biases),
                    setting["conv"] if layer.startswith("conv") else setting["fc"],
                    0,
                )
                for name in leaves
            }
            for layer, leaves in params.items()
        }
        return fisher_optax.quantize(params, bits, mask=mask, init="linear", quantizable=coded)
    if quantizer == "uniform":
        # Choi et al.: evenly spaced levels, one width for every leaf, entropy coded.
        return fisher_optax.quantize(
            params, setting["bits"], mask=mask, method="uniform", quantizable=coded
        )
    if quantizer in SIZE_TARGETED:
        # One price of a bit for every leaf (the rate-distortion allocation), weights
        # quantized to 0 where that pays (pruned by the quantizer). "ecsq_plain" weighs
        # every weight the same: on the rate-distortion page, Fisher weights lost 13-35
        # points below the k-means sizes (no fine-tuning there).
        q, _ = fisher_optax.quantize_to_target(
            params,
            size_bytes=setting["size_bytes"],
            fisher=None if quantizer in ("ecsq_plain", "ecsq_retrain", "ecsq_qat") else fisher,
            mask=mask,
            quantizable=coded,
            prune_zero=True,
            method="fisher_step" if quantizer == "fisher_step" else "ecsq",
        )
        return q
    # One width per leaf (no per-weight width map in the file), chosen from its summed
    # saliency by allocate_bits' exact allocation under the average.
    bits = fisher_optax.allocate_bits(
        params,
        fisher=fisher,
        mask=mask,
        average_bits=setting["average_bits"],
        granularity=setting["granularity"],
        bit_widths=BIT_WIDTHS,
        entry_bits=setting["entry_bits"],
        quantizable=coded,
    )
    return fisher_optax.quantize(params, bits, fisher=fisher, mask=mask, quantizable=coded)


def retrained(q, quantizer, setting, level, cfg, data, model, key):
    """``cfg.retrain_rounds`` rounds of: retrain the weights ``q`` keeps (its zeros held at
    0), then quantize again at the same setting; the last round's quantized params."""
    params, mask = level["params"], level["mask"]
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    lr = optax.cosine_decay_schedule(cfg.prune_lr, cfg.retrain_steps, 0.1)
    for i in range(cfg.retrain_rounds):
        kept = jax.tree.map(lambda w, m: (w != 0) & m, fisher_optax.dequantize(q), mask)
        opt = optax.chain(optax.adam(lr), fisher_optax.keep_pruned(kept))
        params = fisher_optax.apply_mask(params, kept)
        train = make_trainer(opt, model, cfg.retrain_steps, cfg.batch_size)
        params, _, _ = train(params, opt.init(params), jax.random.fold_in(key, i), x, y)
        mask = kept
        level = {**level, "params": params, "mask": mask}
        q = quantized(quantizer, setting, level, raw_biases=cfg.raw_biases)
    return q


def quantization_aware(q, level, cfg, data, model, key):
    """``cfg.qat_steps`` steps of training through :func:`fisher_optax.fake_quantize` with
    ``q``'s codebooks and zeros, then the trained weights coded by their nearest entries."""
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    kept = jax.tree.map(lambda w, m: (w != 0) & m, fisher_optax.dequantize(q), level["mask"])
    lr = optax.cosine_decay_schedule(cfg.prune_lr, cfg.qat_steps, 0.1)
    opt = optax.chain(optax.adam(lr), fisher_optax.keep_pruned(kept))
    params = fisher_optax.apply_mask(level["params"], kept)

    def loss(p, xb, yb):
        return models.loss_fn(model, fisher_optax.fake_quantize(p, q), xb, yb)

    train = jax.jit(partial(_scan_steps, opt, loss, steps=cfg.qat_steps, batch_size=cfg.batch_size))
    params, _, _ = train(params, opt.init(params), key, x, y)
    return fisher_optax.reassign(params, q)


def file_split(q) -> dict:
    """Bytes of the file by what they code: positions, codes, codebooks, raw leaves."""
    report = fisher_optax.compression_report(q)
    coded = [leaf for leaf in report.leaves if leaf.quantized]
    return {
        "positions": sum(leaf.positions.bytes for leaf in coded),
        "codes": sum(leaf.codes.bytes + leaf.width_map.bytes for leaf in coded),
        "codebooks": sum(leaf.codebook_bytes for leaf in coded),
        "raw": sum(leaf.bytes for leaf in report.leaves if not leaf.quantized),
        "kept": sum(leaf.kept for leaf in coded),
    }


def quant_phase(pruning, quantizer, cfg, data, model, cache, key, level, label, setting):
    names = ("ft_steps", "ft_lr", "raw_biases")
    if quantizer == "ecsq_retrain":
        names += ("retrain_steps", "retrain_rounds")
    if quantizer == "ecsq_qat":
        names += ("qat_steps",)
    fields = {**prune_fields(cfg, pruning), **_fields(cfg, names)}
    ck = _key("quant", fields, pruning, quantizer, level["level"], level["accuracy"], setting)
    hit = cache.get(f"quant-{pruning}-{quantizer}", ck)
    if hit is not None:
        return hit[1]
    t0 = time.perf_counter()
    q = quantized(quantizer, setting, level, raw_biases=cfg.raw_biases)
    if quantizer == "ecsq_retrain":
        q = retrained(q, quantizer, setting, level, cfg, data, model, key)
    if quantizer == "ecsq_qat":
        q = quantization_aware(q, level, cfg, data, model, key)
    opt = fisher_optax.share_codebooks(optax.adam(cfg.ft_lr), q)
    params = fisher_optax.dequantize(q)
    state = opt.init(params)
    train = make_trainer(opt, model, cfg.ft_steps, cfg.batch_size)
    params, state, _ = train(
        params, state, key, jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    )
    q = fisher_optax.requantize(params, q)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.fo"
        size = fisher_optax.save_compressed(path, q)
        loaded = fisher_optax.dequantize(fisher_optax.load_compressed(path))
    n_params = models.n_params(params)
    info = {
        "level": level["level"],
        "sparsity": level["sparsity"],
        "bits": label,
        "bytes": int(size),
        "ratio": 4.0 * n_params / size,
        "bits_per_param": 8.0 * size / n_params,
        "split": file_split(q),
        "accuracy": evaluate(loaded, data, cfg, model),
        "pruned_accuracy": level["accuracy"],
        "seconds": time.perf_counter() - t0,
    }
    cache.put(f"quant-{pruning}-{quantizer}", ck, {}, info)
    return info


def run_seed(cfg: Config, data, cache: Cache, methods: tuple[str, ...] = tuple(METHODS)) -> dict:
    model = models.MODELS[cfg.model]
    key = jax.random.key(cfg.seed, impl=PRNG_IMPL)
    k_dense, k_prune, k_quant = jax.random.split(key, 3)
    dense = dense_phase(cfg, data, model, cache, k_dense)
    out = {"seed": cfg.seed, "dense": dense[3], "methods": {}}
    # Compute time: the sum of the phases' times, measured when each was computed (a rerun
    # that reads them from the cache reports the same figure).
    seconds = dense[3]["seconds"]
    for pruning in [p for p in PRUNING if any(METHODS[m][0] == p for m in methods)]:
        levels = prune_phase(pruning, cfg, data, model, cache, k_prune, dense)
        seconds += sum(lv["seconds"] for lv in levels)
        near = [lv for lv in levels if lv["accuracy"] >= dense[3]["accuracy"] - cfg.quant_margin]
        chosen = (near or levels[:1])[-cfg.quant_levels :]
        sizes: dict[float, list[int]] = {}  # per level, its k-means files (ECSQ's targets)
        for method, (run, quantizer) in METHODS.items():
            if run != pruning or method not in methods:
                continue
            points = []
            for lv in chosen:
                settings = quant_settings(quantizer, cfg, dense[0], sizes.get(lv["level"], ()))
                for label, s in tqdm(
                    settings,
                    desc=f"{cfg.model} seed {cfg.seed}: {method} at {lv['level']:g}",
                    leave=False,
                ):
                    p = quant_phase(
                        pruning, quantizer, cfg, data, model, cache, k_quant, lv, label, s
                    )
                    points.append(p)
                    if quantizer == "kmeans":
                        sizes.setdefault(lv["level"], []).append(p["bytes"])
            seconds += sum(p["seconds"] for p in points)
            out["methods"][method] = {
                "pruning": pruning,
                "quantizer": quantizer,
                "levels": [
                    {k: v for k, v in lv.items() if k not in ("params", "mask", "fisher")}
                    for lv in levels
                ],
                "quantized": points,
            }
    out["seconds"] = seconds
    return out


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dataset", default="digits", help="digits | fashion-mnist | mnist (with --data-dir)"
    )
    p.add_argument("--data-dir", default=None, help="a directory of MNIST-format IDX files")
    p.add_argument(
        "--models",
        default=None,
        help="comma list of experiments/models.py names "
        "(default: digits-cnn on digits, lenet5,lenet-300-100 otherwise)",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma list of the methods to run (default: all of {', '.join(METHODS)}); "
        "a method's pruning run is computed once for every method that uses it",
    )
    p.add_argument("--quick", action="store_true", help="a tiny run for CI")
    p.add_argument("--out", default="results")
    p.add_argument("--cache-dir", default=None, help="default: <out>/cache")
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="replace the generated section of the docs results page (--docs-page)",
    )
    p.add_argument(
        "--docs-page",
        default=None,
        help="default: docs/results/main-<dataset>.md in the repository",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--entry-bits",
        type=float,
        default=None,
        help="allocate_bits' entry_bits for the Fisher methods (default: the model's preset, "
        "40 on the LeNets, 0 on digits)",
    )
    p.add_argument(
        "--raw-biases",
        action="store_true",
        help="store the biases raw (quantize's default) instead of coding them like kernels",
    )
    p.add_argument(
        "--render-only", action="store_true", help="report from <out>/<dataset>-main.json"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes: each computes whole (model, seed) runs into the cache, then "
        "the report is assembled from it (every phase is cached, so the numbers are the same)",
    )
    p.add_argument(
        "--fill-cache", action="store_true", help="(a worker of --jobs) compute, write no report"
    )
    return p


def fill_cache_in_parallel(args, names: list[str], seeds: list[int], cache_dir: str) -> None:
    """Run every (model, seed) in one of ``args.jobs`` worker processes sharing the cache.

    The phases of different seeds or models never share a cache entry, so the workers do not
    write the same files; units are handed out in the order of ``names``. A worker that fails
    fails the run (its output is on stderr). The workers run ``python -m experiments.main_job``
    from the repository root, so every path they are given is absolute.
    """
    units = [(n, s) for n in names for s in seeds]  # in order: the first model is the slowest
    base = [
        sys.executable,
        "-m",
        "experiments.main_job",
        "--dataset",
        args.dataset,
        "--out",
        str(Path(args.out).resolve()),
        "--cache-dir",
        str(Path(cache_dir).resolve()),
        "--fill-cache",
    ]
    if args.data_dir:
        base += ["--data-dir", str(Path(args.data_dir).resolve())]
    if args.quick:
        base += ["--quick"]
    if args.entry_bits is not None:
        base += ["--entry-bits", str(args.entry_bits)]
    if args.methods:
        base += ["--methods", args.methods]

    def work(unit: tuple[str, int]) -> None:
        name, seed = unit
        cmd = [*base, "--models", name, "--seeds", str(seed)]
        done = subprocess.run(cmd, check=False, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"worker {name} seed {seed} failed (rc {done.returncode}): {cmd}")

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(work, units))


def load_data(args) -> datasets.Dataset:
    if args.dataset == "digits":
        return datasets.load_digits_dataset()
    if args.dataset == "fashion-mnist":
        return datasets.load_fashion_mnist(args.data_dir)
    if args.data_dir is None:
        raise SystemExit(f"--dataset {args.dataset}: pass --data-dir DIR (MNIST-format IDX files).")
    return datasets.load_mnist_format(args.data_dir, name=args.dataset)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out)
    json_path = out_dir / f"{args.dataset}-main.json"
    if args.render_only:
        record = json.loads(json_path.read_text())
    else:
        names = (
            args.models.split(",")
            if args.models
            else (["digits-cnn"] if args.dataset == "digits" else ["lenet5", "lenet-300-100"])
        )
        for n in names:
            if n not in PRESETS:
                raise SystemExit(f"--models: unknown model {n!r}; choose from {sorted(PRESETS)}")
        methods = tuple(args.methods.split(",")) if args.methods else tuple(METHODS)
        for m in methods:
            if m not in METHODS:
                raise SystemExit(f"--methods: unknown method {m!r}; choose from {list(METHODS)}")
            pruning, quantizer = METHODS[m]
            if quantizer in SIZE_TARGETED and pruning not in methods:
                raise SystemExit(
                    f"--methods: {m} needs {pruning} too: its targets are the sizes of "
                    f"{pruning}'s k-means files"
                )
        seeds = [int(s) for s in args.seeds.split(",")]
        if args.quick:
            seeds = seeds[:1]
        if args.jobs < 1:
            raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
        cache_dir = args.cache_dir or str(out_dir / "cache")
        t_all = time.perf_counter()
        if args.jobs > 1:
            fill_cache_in_parallel(args, names, seeds, cache_dir)
        data = load_data(args)
        cache = Cache(cache_dir)
        record = {
            "dataset": args.dataset,
            "quick": args.quick,
            "models": {},
            "platform": f"{jax.default_backend()} jax {jax.__version__}",
            "machine": f"{platform.machine()}, {report.cpu_cores()} CPU cores",
            "date_utc": time.strftime("%Y-%m-%d", time.gmtime()),
            "jobs": args.jobs,
            "code_version": CODE_VERSION,
        }
        for name in names:
            preset = dict(PRESETS[name], **(QUICK if args.quick else {}))
            if args.entry_bits is not None:
                preset["entry_bits"] = args.entry_bits
            if args.raw_biases:
                preset["raw_biases"] = True
            t0 = time.perf_counter()
            runs = []
            for seed in seeds:
                cfg = Config(dataset=args.dataset, model=name, seed=seed, **preset)
                runs.append(run_seed(cfg, data, cache, methods))
            config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "seed"}
            record["models"][name] = {
                "config": config,
                "seeds": runs,
                "seconds": sum(r["seconds"] for r in runs),
                "wall_seconds": time.perf_counter() - t0,
                "describe": models.MODELS[name].describe(),
            }
        record["seconds"] = sum(m["seconds"] for m in record["models"].values())
        record["wall_seconds"] = time.perf_counter() - t_all
        record["load_average"] = os.getloadavg()[2] if hasattr(os, "getloadavg") else None
        if args.fill_cache:
            return record
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(record, indent=1))
    summary = main_report.render(record, out_dir, plots=not args.no_plots)
    print(summary["text"])
    if args.write_docs:
        page = args.docs_page or REPO / "docs" / "results" / f"main-{record['dataset']}.md"
        # The results folder as the page names it: relative to the repository where it lies
        # inside it (a command to rerun there), else as given.
        out = Path(args.out).resolve()
        shown = str(out.relative_to(REPO)) if out.is_relative_to(REPO) else args.out
        main_report.write_docs(Path(page), record, summary, folder=shown)
    return record


if __name__ == "__main__":
    main()
