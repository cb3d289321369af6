"""Reproduce Tu, Berisha, Cao, Seo (ISVLSI 2016, arXiv:1605.04859) end to end, with seeds.

1. Train a network of ``experiments/models.py`` (a LeNet-5-style CNN by default) with
   ``optax.adam``.
2. Read the diagonal Fisher from Adam's state with ``fisher_optax.fisher_from_state``.
3. Prune the fully connected kernels ("fc", as the paper) and, as a second setting, every
   kernel ("all") at a sweep of sparsities with five criteria: the four of
   ``fisher_optax.scores`` (magnitude |w|, Fisher F, OBD saliency 0.5 F w^2, random) and the
   paper's two stages (magnitude, then Fisher); each without and with a short fine-tuning
   (the same budget for every criterion; Adam continues from its trained state with
   ``keep_pruned`` at the end of the chain, so its Fisher keeps updating).
4. Quantize one pruned model at equal average bits (2..8): uniform fixed point, k-means
   weight sharing, Fisher-weighted k-means, and the paper's Fisher bit allocation; the size
   is that of the real file written by ``save_compressed``.
5. Report (``experiments/report.py``) mean ± std over seeds: a terminal table,
   ``<out>/<dataset>.json`` (every number and the whole configuration),
   ``<out>/<dataset>_sparsity.png`` (the paper's Figure 3), ``<out>/<dataset>_pareto.png``
   (accuracy against compressed size) and, with ``--write-docs``, a generated results
   section between the markers of ``docs/results/oneshot.md``.

Run from the repository root:
      python -m experiments.reproduce                      # digits, 3 seeds (`make oneshot`)
      python -m experiments.reproduce --dataset fashion-mnist --sparsities 50,80,90,95,98
      python -m experiments.reproduce --dataset fashion-mnist --model lenet5
      python -m experiments.reproduce --dataset mnist --data-dir DIR   # any MNIST-format dir
      python -m experiments.reproduce --quick                  # tiny, for CI
      python -m experiments.reproduce --render-only --write-docs   # tables from the JSON

Everything that loops over criteria, sparsities and seeds reuses a handful of compiled
functions (masks, learning rates and data are arguments, not closures): one training/
fine-tuning step, one mask selection, one evaluation; only quantization compiles per bit
width.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
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
from experiments import datasets, models, report
from experiments.versions import code_version

REPO = Path(__file__).resolve().parents[1]
# The criteria of fisher_optax.scores, plus the paper's two stages (magnitude, then Fisher).
METHODS = ("magnitude", "fisher", "saliency", "two_stage", "random")
SETTINGS = ("fc", "all")
QUANT_METHODS = ("uniform", "kmeans", "fisher_kmeans", "fisher_bits")
# XLA on CPU compiles threefry (jax's default PRNG) slowly: 8 uniform draws took 7.4 s of CPU
# to compile, against 2.7 s with "rbg" (a jit of the digits model's random init, 5.9 s vs
# 1.8 s). Every random draw of the experiment uses this implementation; its streams are
# reproducible for a seed on one backend, not across backends.
PRNG_IMPL = "rbg"


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str
    model: str  # a key of models.MODELS
    seeds: tuple[int, ...]
    sparsities: tuple[float, ...]
    train_steps: int
    batch_size: int
    lr: float
    finetune_steps: int
    finetune_lr: float
    chunk: int  # steps per jitted call; training runs train_steps // chunk calls
    magnitude_fraction: float
    scope: str
    quant_setting: str
    quant_method: str
    quant_sparsity: float
    bits: tuple[int, ...]
    bit_widths: tuple[int, ...]
    eval_batch: int
    # kmeans_1d init for the k-means quantizers; None is quantize's default ("dp", near the
    # optimum, about twice the compile time of "density" on CPU).
    kmeans_init: str | None = None
    # --quant-sparsity auto: quant_sparsity is chosen after the pruning phase.
    quant_sparsity_auto: bool = False
    # What is swept; the report reads these names.
    methods: tuple[str, ...] = METHODS
    settings: tuple[str, ...] = SETTINGS
    quant_methods: tuple[str, ...] = QUANT_METHODS


DEFAULTS = {
    # 1,438 training images of 8x8: small kernels and SAME padding (the digits are tiny).
    "digits": dict(
        model="digits-cnn",
        train_steps=1000,
        batch_size=64,
        lr=2e-3,
        finetune_steps=50,
        finetune_lr=1e-3,
        chunk=50,
        eval_batch=512,
    ),
    "mnist-format": dict(
        model="small-lenet",
        train_steps=1000,
        batch_size=128,
        lr=1e-3,
        finetune_steps=30,
        finetune_lr=5e-4,
        chunk=50,
        eval_batch=1000,
    ),
}
QUICK = dict(
    train_steps=20, finetune_steps=5, chunk=5, seeds=(0,), sparsities=(0.5, 0.9), bits=(2,)
)


def parse_floats(text: str) -> tuple[float, ...]:
    vals = []
    for tok in text.split(","):
        v = float(tok)
        vals.append(v / 100 if v > 1 else v)  # "90" and "0.9" both mean 90%
    return tuple(vals)


def parse_ints(text: str) -> tuple[int, ...]:
    if "-" in text and "," not in text:
        lo, hi = (int(t) for t in text.split("-"))
        return tuple(range(lo, hi + 1))
    return tuple(int(t) for t in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dataset",
        default="digits",
        help="digits | fashion-mnist | any name "
        "with --data-dir (a directory of MNIST-format IDX files)",
    )
    p.add_argument("--data-dir", default=None, help="directory of MNIST-format IDX files")
    p.add_argument(
        "--model",
        default=None,
        choices=tuple(models.MODELS),
        help="the network (experiments/models.py); default: digits-cnn on digits, small-lenet "
        "on 28x28 datasets",
    )
    p.add_argument("--seeds", type=parse_ints, default=(0, 1, 2), help="e.g. 0,1,2 or 0-4")
    p.add_argument(
        "--sparsities",
        type=parse_floats,
        default=(0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99),
        help="comma list, percent or fraction",
    )
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=None,
        help="fine-tuning budget after pruning, the same for every criterion",
    )
    p.add_argument("--finetune-lr", type=float, default=None)
    p.add_argument(
        "--magnitude-fraction",
        type=float,
        default=0.5,
        help="two_stage: the share of the target sparsity pruned by magnitude "
        "first (magnitude_sparsity = fraction * sparsity); the rest by Fisher",
    )
    p.add_argument("--scope", default="global", choices=("global", "layer"))
    p.add_argument("--quant-setting", default="all", choices=SETTINGS)
    p.add_argument(
        "--quant-method",
        default="two_stage",
        choices=METHODS,
        help="which fine-tuned pruned model is quantized",
    )
    p.add_argument(
        "--quant-sparsity",
        default="auto",
        help="sparsity of the pruned model to quantize: a swept value, or auto (the highest "
        "one whose fine-tuned accuracy stays within 1 point of dense)",
    )
    p.add_argument(
        "--kmeans-init",
        default="density",
        choices=("density", "dp", "linear", "quantile"),
        help="kmeans_1d init of the k-means quantizers: density (default here: half the "
        "compile time) or dp (quantize's own default, nearer the optimum)",
    )
    p.add_argument(
        "--bits",
        type=parse_ints,
        default=(2, 3, 4, 6, 8),
        help="average bits per surviving weight, e.g. 2-8",
    )
    p.add_argument(
        "--bit-widths",
        type=parse_ints,
        default=None,
        help="fisher_bits: the widths the allocation picks from (default: allocate_bits' default)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run for CI: few steps, one seed, two sparsities",
    )
    p.add_argument("--out", default="results", help="directory for JSON and PNGs")
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="replace the generated section of this dataset in the docs results page",
    )
    p.add_argument(
        "--docs-page", default=None, help="default: docs/results/oneshot.md in the repository"
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="recompute nothing: re-render tables, plots and the docs section from "
        "<out>/<dataset>.json",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="store each seed's pruning phase (results, fine-tuned model, Fisher) here and "
        "reuse it when the configuration matches; quantization is always recomputed",
    )
    return p


def make_config(args: argparse.Namespace) -> Config:
    base = dict(DEFAULTS["digits" if args.dataset == "digits" else "mnist-format"])
    seeds, sparsities = args.seeds, args.sparsities
    if args.quick:
        base.update({k: v for k, v in QUICK.items() if k not in ("seeds", "sparsities", "bits")})
        seeds, sparsities, bits = QUICK["seeds"], QUICK["sparsities"], QUICK["bits"]
    else:
        bits = args.bits
    for name in ("model", "train_steps", "batch_size", "lr", "finetune_steps", "finetune_lr"):
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    base["chunk"] = min(base["chunk"], base["finetune_steps"])
    if base["train_steps"] % base["chunk"]:
        base["train_steps"] += base["chunk"] - base["train_steps"] % base["chunk"]
    auto = args.quant_sparsity == "auto"
    quant_sparsity = max(sparsities) if auto else parse_floats(args.quant_sparsity)[0]
    if quant_sparsity not in sparsities:
        quant_sparsity = min(sparsities, key=lambda s: abs(s - quant_sparsity))
    if not 0.0 <= args.magnitude_fraction <= 1.0:
        raise SystemExit(f"--magnitude-fraction must lie in [0, 1], got {args.magnitude_fraction}")
    if any(not 0.0 <= s < 1.0 for s in sparsities):
        raise SystemExit(f"--sparsities must lie in [0, 1), got {sparsities}")
    return Config(
        dataset=args.dataset,
        seeds=tuple(seeds),
        sparsities=tuple(sorted(sparsities)),
        magnitude_fraction=args.magnitude_fraction,
        scope=args.scope,
        quant_setting=args.quant_setting,
        quant_method=args.quant_method,
        quant_sparsity=quant_sparsity,
        bits=tuple(bits),
        kmeans_init=None if args.kmeans_init == "dp" else args.kmeans_init,
        quant_sparsity_auto=auto,
        bit_widths=tuple(args.bit_widths) if args.bit_widths else (),
        **base,
    )


def load_data(args: argparse.Namespace) -> datasets.Dataset:
    if args.dataset == "digits":
        return datasets.load_digits_dataset()
    if args.dataset == "fashion-mnist":
        return datasets.load_fashion_mnist(args.data_dir)
    if args.data_dir is None:
        raise SystemExit(
            f"--dataset {args.dataset}: pass --data-dir DIR, a directory of MNIST-format IDX "
            "files (train-images-idx3-ubyte.gz, ...), or use --dataset digits|fashion-mnist."
        )
    return datasets.load_mnist_format(args.data_dir, name=args.dataset)


def config_from_dict(d: dict) -> Config:
    """The Config of a record's ``config`` (its JSON); records before the model split named the
    CNN by its fields, which are mapped back to the name in ``models.MODELS``."""
    fields = {f.name for f in dataclasses.fields(Config)}
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
    if isinstance(d["model"], dict):
        old = {k: tuple(v) if isinstance(v, list) else v for k, v in d["model"].items()}
        d["model"] = next(
            n
            for n, m in models.MODELS.items()
            if isinstance(m, models.CNN) and dataclasses.asdict(m) == old
        )
    return Config(**d)


# ---------------------------------------------------------------------------------------------
# Jitted building blocks. Masks, learning rates and data are arguments, never closures, so that
# each function compiles once for the whole sweep. ``model`` (a hashable frozen dataclass of
# experiments/models.py) is static.


def make_optimizer(lr, mask):
    return optax.chain(optax.adam(lr), fisher_optax.keep_pruned(mask))


@jax.jit
def init_opt_state(params, mask):
    return make_optimizer(1.0, mask).init(params)


@partial(jax.jit, static_argnames=("model", "steps", "batch_size"))
def train_chunk(params, opt_state, mask, lr, key, x, y, *, model, steps, batch_size):
    """``steps`` Adam steps on random batches, with ``keep_pruned(mask)`` ending the chain.

    ``opt_state[0]`` is Adam's state; the ``keep_pruned`` state is rebuilt for ``mask``, so
    one compiled function trains the dense model (an all-True mask) and fine-tunes every
    pruned one, continuing Adam's moments (and so its Fisher) from the trained state.
    """
    opt = make_optimizer(lr, mask)
    opt_state = (opt_state[0], *opt.init(params)[1:])
    params = fisher_optax.apply_mask(params, mask)

    def step(carry, k):
        params, opt_state = carry
        idx = jax.random.randint(k, (batch_size,), 0, x.shape[0])
        loss, grads = jax.value_and_grad(partial(models.loss_fn, model))(params, x[idx], y[idx])
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = lax.scan(step, (params, opt_state), jax.random.split(key, steps))
    return params, opt_state, losses.mean()


def _batches(x, batch, fill):
    """``x`` padded with ``fill`` to a multiple of ``batch``, as (n_batches, batch, ...)."""
    pad = jnp.full((-x.shape[0] % batch, *x.shape[1:]), fill, x.dtype)
    return jnp.concatenate([x, pad]).reshape(-1, batch, *x.shape[1:])


def _batched_accuracy(fn, params, x, y, batch):
    # Padded labels are -1, which never equals an argmax.
    xs, ys = _batches(x, batch, 0), _batches(y, batch, -1)
    correct = lax.map(lambda b: jnp.sum(jnp.argmax(fn(params, b[0]), -1) == b[1]), (xs, ys))
    return correct.sum() / x.shape[0]


@partial(jax.jit, static_argnames=("model", "batch"))
def accuracy(params, mask, x, y, *, model, batch):
    """Test accuracy of ``apply_mask(params, mask)``."""
    params = fisher_optax.apply_mask(params, mask)
    return _batched_accuracy(partial(models.apply, model), params, x, y, batch)


@partial(jax.jit, static_argnames=("model", "batch"))
def trunk_features(params, x, *, model, batch):
    h = lax.map(lambda b: model.trunk(params, b), _batches(x, batch, 0))
    return h.reshape(-1, h.shape[-1])[: x.shape[0]]


@partial(jax.jit, static_argnames=("model", "batch"))
def head_accuracy(params, mask, h, y, *, model, batch):
    """Accuracy from cached trunk features: exact when only FC weights are pruned."""
    return _batched_accuracy(model.head, fisher_optax.apply_mask(params, mask), h, y, batch)


@partial(jax.jit, static_argnames=("batch_size",))
def read_fisher(opt_state, *, batch_size):
    return fisher_optax.fisher_from_state(opt_state, batch_size=batch_size)


@jax.jit
def criterion_scores(params, fisher, key):
    """The scores of every method, from ``fisher_optax.scores``, in one compiled call.

    two_stage ranks its second stage by the Fisher (its first stage is in ``select_mask``).
    """
    out = {
        c: fisher_optax.scores(params, c, fisher=fisher, key=key if c == "random" else None)
        for c in ("magnitude", "fisher", "saliency", "random")
    }
    return {m: out["fisher" if m == "two_stage" else m] for m in METHODS}


@partial(jax.jit, static_argnames=("scope",))
def select_mask(params, scores, sparsity, magnitude_sparsity, prunable, *, scope="global"):
    """Stage one by magnitude, stage two by ``scores``, exactly as ``two_stage_mask``.

    With ``magnitude_sparsity = 0`` stage one prunes nothing and this is ``select`` over
    ``scores``: the masks of ``magnitude_mask`` and of ``select`` over the other criteria. One
    compiled selection serves every criterion, sparsity and setting (``prunable`` is a traced
    bool pytree) instead of one compilation per criterion and setting;
    tests/test_reproduce.py checks that it equals the named functions.
    """
    kw = dict(pattern=fisher_optax.Unstructured(scope), prunable=prunable)
    stage1 = fisher_optax.magnitude_mask(params, magnitude_sparsity, **kw)
    return fisher_optax.select(scores, sparsity, mask=stage1, **kw)


def all_masks(params, fisher, sparsity, magnitude_fraction, key, setting, scope="global"):
    """Every method's mask at one sparsity, pruning the kernels of ``setting``.

    two_stage prunes ``magnitude_fraction * sparsity`` by magnitude first, the rest by Fisher.
    """
    # NumPy constants, not jnp ops: every eager jnp op costs a compilation of its own.
    prunable = jax.tree.map(
        lambda x, f: np.full(x.shape, f), params, models.prunable_tree(params, setting)
    )
    scores = criterion_scores(params, fisher, key)
    sp = np.float32(sparsity)
    return {
        m: select_mask(
            params,
            scores[m],
            sp,
            sp * np.float32(magnitude_fraction if m == "two_stage" else 0.0),
            prunable,
            scope=scope,
        )
        for m in METHODS
    }


# ---------------------------------------------------------------------------------------------
# The experiment


def param_shapes(model, image_shape: tuple[int, ...]):
    """The params' structure and shapes (``jax.ShapeDtypeStruct`` leaves), without compiling."""
    key = jax.random.key(0, impl=PRNG_IMPL)
    return jax.eval_shape(lambda k: model.init(k, image_shape), key)


def ones_mask(params):
    return jax.tree.map(lambda x: np.ones(x.shape, bool), params)


def quantize_all(cfg: Config, params, mask, fisher, evaluate, tmpdir: Path) -> dict:
    """Every quantizer at every average bit width: accuracy, file bytes, ratio, mean bits."""
    out: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in QUANT_METHODS}
    dense_bytes = 4 * models.n_params(params)
    params, mask, fisher = jax.tree.map(np.asarray, (params, mask, fisher))
    kw = {"init": cfg.kmeans_init} if cfg.kmeans_init else {}
    for b in cfg.bits:
        for qm in QUANT_METHODS:
            if qm == "uniform":
                q = fisher_optax.quantize(params, b, mask=mask, method="uniform")
            elif qm == "kmeans":
                q = fisher_optax.quantize(params, b, mask=mask, method="kmeans", **kw)
            elif qm == "fisher_kmeans":
                q = fisher_optax.quantize(
                    params, b, fisher=fisher, mask=mask, method="kmeans", **kw
                )
            else:
                widths = {"bit_widths": cfg.bit_widths} if cfg.bit_widths else {}
                bits = fisher_optax.allocate_bits(
                    params, fisher=fisher, mask=mask, average_bits=b, **widths
                )
                bits = jax.tree.map(np.asarray, bits)
                q = fisher_optax.quantize(
                    params, bits, fisher=fisher, mask=mask, method="kmeans", **kw
                )
            path = tmpdir / f"{qm}_{b}.fz"
            fisher_optax.save_compressed(path, q)
            size = path.stat().st_size
            # Mean width of the coded weights (raw leaves, such as biases, have no bits).
            qbits = np.concatenate([np.asarray(x).reshape(-1) for x in q.bits if x is not None])
            out[qm][str(b)] = {
                "acc": float(evaluate(dequantize_jit(q))),
                "bytes": int(size),
                "ratio": dense_bytes / size,
                "avg_bits": float(qbits[qbits > 0].mean()) if (qbits > 0).any() else 0.0,
                "widths": sorted({int(w) for ws in q.widths for w in ws}),
                **file_streams(fisher_optax.compression_report(q)),
            }
            path.unlink()
    return out


def file_streams(report: fisher_optax.CompressionReport) -> dict[str, Any]:
    """The file's size as ``compression_report`` counts it, and its bytes per stream."""
    leaves = report.leaves
    return {
        "report_bytes": int(report.total_bytes),
        "stream_bytes": {
            "codes": sum(leaf.codes.bytes for leaf in leaves),
            "positions": sum(leaf.positions.bytes for leaf in leaves),
            "width_map": sum(leaf.width_map.bytes for leaf in leaves),
            "codebooks": sum(leaf.codebook_bytes for leaf in leaves),
            "raw": sum(leaf.raw_bytes for leaf in leaves),
        },
    }


@jax.jit
def dequantize_jit(q):
    return fisher_optax.dequantize(q)


def prune_phase(cfg: Config, data: datasets.Dataset, seed: int, dev) -> tuple[dict, tuple]:
    """Train, read the Fisher, prune with every criterion, fine-tune; the quantization base."""
    t_phase = time.perf_counter()
    model = models.MODELS[cfg.model]
    x_train, y_train, x_test, y_test = dev
    key = jax.random.key(seed, impl=PRNG_IMPL)
    k_init, k_train, k_rand, k_ft = jax.random.split(key, 4)
    params = model.init(k_init, tuple(data.x_train.shape[1:]))
    dense_mask = ones_mask(params)
    opt_state = init_opt_state(params, dense_mask)
    chunks = cfg.train_steps // cfg.chunk
    t0 = time.perf_counter()
    bar = tqdm(
        range(chunks), desc=f"seed {seed}: train", unit="chunk", leave=False, dynamic_ncols=True
    )
    for i in bar:
        params, opt_state, loss = train_chunk(
            params,
            opt_state,
            dense_mask,
            cfg.lr,
            jax.random.fold_in(k_train, i),
            x_train,
            y_train,
            model=model,
            steps=cfg.chunk,
            batch_size=cfg.batch_size,
        )
        bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    train_time = time.perf_counter() - t0

    def evaluate(p, mask=dense_mask):
        return float(accuracy(p, mask, x_test, y_test, model=model, batch=cfg.eval_batch))

    dense_acc = evaluate(params)
    fisher = read_fisher(opt_state, batch_size=cfg.batch_size)
    h_test = trunk_features(params, x_test, model=model, batch=cfg.eval_batch)
    result: dict[str, Any] = {
        "seed": seed,
        "dense_acc": dense_acc,
        "train_time_s": train_time,
        "train_final_loss": float(loss),
        "pruning": {s: {meth: {"no_ft": {}, "ft": {}} for meth in METHODS} for s in SETTINGS},
        "achieved_sparsity": {s: {} for s in SETTINGS},
    }
    bases: dict[str, tuple] = {}  # sparsity -> (params, mask, Fisher) to quantize
    jobs = [(s, sp) for s in SETTINGS for sp in cfg.sparsities]
    bar = tqdm(
        total=len(jobs) * len(METHODS),
        desc=f"seed {seed}: prune+fine-tune",
        leave=False,
        dynamic_ncols=True,
    )
    for setting, sp in jobs:
        masks = all_masks(
            params,
            fisher,
            sp,
            cfg.magnitude_fraction,
            jax.random.fold_in(k_rand, round(sp * 1e4)),
            setting,
            cfg.scope,
        )
        prunable = models.prunable_tree(params, setting)
        for meth in METHODS:
            mask = masks[meth]
            if setting == "fc":  # the trunk is untouched: reuse its test features
                acc0 = float(
                    head_accuracy(params, mask, h_test, y_test, model=model, batch=cfg.eval_batch)
                )
            else:
                acc0 = evaluate(params, mask)
            ft_params, ft_state, _ = train_chunk(
                params,
                opt_state,
                mask,
                cfg.finetune_lr,
                jax.random.fold_in(k_ft, round(sp * 1e4)),
                x_train,
                y_train,
                model=model,
                steps=cfg.finetune_steps,
                batch_size=cfg.batch_size,
            )
            acc1 = evaluate(ft_params)
            key_sp = f"{sp:g}"
            result["pruning"][setting][meth]["no_ft"][key_sp] = acc0
            result["pruning"][setting][meth]["ft"][key_sp] = acc1
            if meth == "magnitude":
                mask_np = jax.tree.map(np.asarray, mask)
                rep = fisher_optax.sparsity_report(mask_np, prunable=prunable)
                kept = sum(int(v.sum()) for v in jax.tree.leaves(mask_np))
                result["achieved_sparsity"][setting][key_sp] = {
                    "prunable": rep.sparsity,
                    "of_all_params": 1 - kept / models.n_params(params),
                    "per_leaf": {k: v.sparsity for k, v in rep.leaves.items()},
                }
            if (setting, meth) == (cfg.quant_setting, cfg.quant_method):
                # The Fisher after fine-tuning: Adam kept updating it on the pruned model.
                ft_fisher = read_fisher(ft_state, batch_size=cfg.batch_size)
                as_np = lambda t: jax.tree.map(np.asarray, t)
                bases[key_sp] = (as_np(ft_params), as_np(mask), as_np(ft_fisher))
            bar.update()
    bar.close()

    result["prune_phase_time_s"] = time.perf_counter() - t_phase
    return result, bases


def quant_phase(cfg: Config, quant_base: tuple, dev, tmpdir: Path) -> dict:
    ft_params, mask, ft_fisher = quant_base
    _, _, x_test, y_test = dev
    ones = ones_mask(ft_params)

    def evaluate(p):
        return float(
            accuracy(p, ones, x_test, y_test, model=models.MODELS[cfg.model], batch=cfg.eval_batch)
        )

    t0 = time.perf_counter()
    out = quantize_all(cfg, ft_params, mask, ft_fisher, evaluate, tmpdir)
    return {"quantization": out, "quantization_time_s": time.perf_counter() - t0}


# Every change to the code invalidates --cache-dir.
_CACHE_VERSION = code_version()


def _cache_key(cfg: Config, data: datasets.Dataset, seed: int) -> str:
    fields = dataclasses.asdict(cfg)
    # The quantization phase is always recomputed.
    for k in ("seeds", "bits", "bit_widths", "quant_sparsity", "kmeans_init"):
        fields.pop(k)
    blob = json.dumps(
        [_CACHE_VERSION, fields, data.source, len(data.y_train), seed], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_tree(path: Path, tree) -> None:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


def _load_tree(path: Path, like):
    with np.load(path, allow_pickle=False) as z:
        flat, treedef = jax.tree_util.tree_flatten_with_path(like)
        return jax.tree.unflatten(treedef, [z[jax.tree_util.keystr(k)] for k, _ in flat])


def prune_seed(cfg, data, seed, dev, cache_dir: Path | None) -> tuple[dict, dict]:
    """The pruning phase of one seed; with ``cache_dir``, stored and reused."""
    if cache_dir is not None:
        stem = f"{cfg.dataset}-seed{seed}-{_cache_key(cfg, data, seed)}"
        meta_file = cache_dir / f"{stem}.json"
        files = {
            f"{sp:g}": [cache_dir / f"{stem}-{sp:g}-{n}.npz" for n in ("params", "mask", "fisher")]
            for sp in cfg.sparsities
        }
        if meta_file.is_file() and all(f.is_file() for fs in files.values() for f in fs):
            like = param_shapes(models.MODELS[cfg.model], tuple(data.x_train.shape[1:]))
            result = json.loads(meta_file.read_text())
            bases = {}
            for k, fs in files.items():
                p, m, f = (_load_tree(path, like) for path in fs)
                bases[k] = (p, jax.tree.map(lambda x: x.astype(bool), m), f)
            result["prune_phase_cached"] = True
            print(f"seed {seed}: pruning phase loaded from {meta_file}")
            return result, bases
    result, bases = prune_phase(cfg, data, seed, dev)
    result["prune_phase_cached"] = False
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for k, fs in files.items():
            for path, tree in zip(fs, bases[k], strict=True):
                _save_tree(path, tree)
        meta_file.write_text(json.dumps(result))
    return result, bases


def choose_quant_sparsity(cfg: Config, results: list[dict]) -> float:
    """The highest swept sparsity at which the fine-tuned ``quant_method`` model (mean over
    seeds) stays within one point of the dense accuracy; the lowest one if none does.

    Chosen on the test set, as Deep Compression reports its operating point.
    """
    dense = np.mean([r["dense_acc"] for r in results])
    ok = [
        sp
        for sp in cfg.sparsities
        if np.mean(
            [r["pruning"][cfg.quant_setting][cfg.quant_method]["ft"][f"{sp:g}"] for r in results]
        )
        >= dense - 0.01
    ]
    return max(ok) if ok else min(cfg.sparsities)


def compute(args: argparse.Namespace, argv: list[str]) -> dict:
    """Run every seed; return the record that ``render`` reports and ``--render-only`` reads."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    cfg = make_config(args)
    data = load_data(args)
    dev = tuple(jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test))
    model = models.MODELS[cfg.model]
    probe = param_shapes(model, tuple(data.x_train.shape[1:]))
    flags = {s: jax.tree.leaves(models.prunable_tree(probe, s)) for s in SETTINGS}
    meta = {
        "model_description": model.describe(),
        "n_params": models.n_params(probe),
        "n_prunable": {
            s: sum(x.size for x, f in zip(jax.tree.leaves(probe), flags[s], strict=True) if f)
            for s in SETTINGS
        },
        "jax": jax.__version__,
        "optax": optax.__version__,
        "fisher_optax": fisher_optax.__version__,
        "backend": jax.default_backend(),
        "machine": f"{platform.machine()}, {report.cpu_cores()} CPU cores"
        if jax.default_backend() == "cpu"
        else str(jax.devices()[0].device_kind),
        "python": platform.python_version(),
        "data_source": data.source,
        "n_train": len(data.y_train),
        "n_test": len(data.y_test),
        "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(
        f"{cfg.dataset}: {meta['n_train']} train / {meta['n_test']} test images, "
        f"{meta['n_params']:,} parameters; seeds {cfg.seeds}; sparsities {cfg.sparsities}"
    )
    runs, bases = [], []
    cache = Path(args.cache_dir) if args.cache_dir else None
    for seed in cfg.seeds:
        r, b = prune_seed(cfg, data, seed, dev, cache)
        print(
            f"seed {seed}: dense accuracy {report.pct(r['dense_acc'])} %, trained in "
            f"{r['train_time_s']:.0f} s, pruning phase {r['prune_phase_time_s']:.0f} s"
            f"{' (cached)' if r['prune_phase_cached'] else ''}"
        )
        runs.append(r)
        bases.append(b)
    if cfg.quant_sparsity_auto:
        cfg = dataclasses.replace(cfg, quant_sparsity=choose_quant_sparsity(cfg, runs))
    key = f"{cfg.quant_sparsity:g}"
    print(f"quantizing the {cfg.quant_method} models pruned to {cfg.quant_sparsity:.0%}")
    with tempfile.TemporaryDirectory() as tmp:
        for seed, r, b in zip(cfg.seeds, runs, bases, strict=True):
            r.update(quant_phase(cfg, b[key], dev, Path(tmp)))
            r["quant_base_acc"] = r["pruning"][cfg.quant_setting][cfg.quant_method]["ft"][key]
            print(f"seed {seed}: quantized in {r['quantization_time_s']:.0f} s")
    wall = time.perf_counter() - t_start
    cached = sum(r["prune_phase_time_s"] for r in runs if r["prune_phase_cached"])
    return {
        "config": {**dataclasses.asdict(cfg), "argv": argv},
        "meta": meta,
        "wall_time_s": wall,
        # CPU seconds of this process, all threads: on a machine shared with other jobs the
        # wall time grows with their load, this much less.
        "cpu_time_s": time.process_time() - cpu_start,
        # Pruning phases loaded from --cache-dir were measured when they ran.
        "compute_time_s": wall + cached,
        "cached_prune_time_s": cached,
        "runs": runs,
    }


def equivalent_argv(cfg: Config, record: dict) -> list[str]:
    """The run's argv, plus the flags whose defaults have changed since it ran."""
    argv = list(record["config"]["argv"])
    defaults = build_parser().parse_args([])
    if "--bits" not in argv and tuple(cfg.bits) != tuple(defaults.bits):
        argv += ["--bits", ",".join(str(b) for b in cfg.bits)]
    if "--quant-sparsity" not in argv and not cfg.quant_sparsity_auto:
        argv += ["--quant-sparsity", f"{cfg.quant_sparsity:g}"]
    default_model = DEFAULTS["digits" if cfg.dataset == "digits" else "mnist-format"]["model"]
    if "--model" not in argv and cfg.model != default_model:
        argv += ["--model", cfg.model]
    init = cfg.kmeans_init or "dp"
    if "--kmeans-init" not in argv and init != defaults.kmeans_init:
        argv += ["--kmeans-init", init]
    return argv


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        path = out_dir / f"{args.dataset}.json"
        if not path.is_file():
            raise SystemExit(f"--render-only: no {path}; run without --render-only first.")
        record = json.loads(path.read_text())
    else:
        record = compute(args, argv)
    cfg = config_from_dict(record["config"])
    return report.render(
        cfg,
        record,
        out_dir,
        plots=not args.no_plots,
        page=Path(args.docs_page or REPO / "docs" / "results" / "oneshot.md")
        if args.write_docs
        else None,
        command=" ".join(["python -m experiments.reproduce", *equivalent_argv(cfg, record)]),
    )


if __name__ == "__main__":
    main()
