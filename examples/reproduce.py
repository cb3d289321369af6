"""Reproduce Tu, Berisha, Cao, Seo (ISVLSI 2016, arXiv:1605.04859) end to end, with seeds.

1. Train a LeNet-5-style CNN (two conv + two fully connected layers) with ``optax.adam``.
2. Read the diagonal Fisher from Adam's state with ``fisher_optax.fisher_from_state``.
3. Prune the fully connected kernels ("fc", as the paper) and, as a second setting, every
   kernel ("all") at a sweep of sparsities with five criteria: magnitude |w|, Fisher F,
   OBD saliency 0.5 F w^2, the paper's two stages (magnitude, then Fisher) and random;
   each without and with a short fine-tuning (the same budget for every criterion; Adam
   continues from its trained state with ``keep_pruned`` at the end of the chain, so its
   Fisher keeps updating).
4. Quantize one pruned model at equal average bits (2..8): uniform fixed point, k-means
   weight sharing, Fisher-weighted k-means, and the paper's Fisher bit allocation; the size
   is that of the real file written by ``save_compressed``.
5. Report mean ± std over seeds: a terminal table, ``<out>/<dataset>.json`` (every number
   and the whole configuration), ``<out>/<dataset>_sparsity.png`` (the paper's Figure 3),
   ``<out>/<dataset>_pareto.png`` (accuracy against compressed size) and, with
   ``--write-readme``, a generated results section between the README's markers.

Run:  python examples/reproduce.py                      # digits, 3 seeds (`make demo`)
      python examples/reproduce.py --dataset fashion-mnist --sparsities 50,80,90,95,98
      python examples/reproduce.py --dataset mnist --data-dir DIR   # any MNIST-format dir
      python examples/reproduce.py --quick                  # tiny, for CI
      python examples/reproduce.py --render-only --write-readme   # tables from the JSON

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
import math
import os
import platform
import re
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

if __package__ in (None, ""):
    # Run as a script (python examples/reproduce.py): put the repository root on the path so
    # that the sibling modules import as examples.* here too, as they do in the tests.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import datasets

REPO = Path(__file__).resolve().parents[1]
METHODS = ("magnitude", "fisher", "saliency", "two_stage", "random")
SETTINGS = ("fc", "all")
QUANT_METHODS = ("uniform", "kmeans", "fisher_kmeans", "fisher_bits")
DEEP_COMPRESSION_LENET5 = 39.0  # Han, Mao, Dally 2016, Table 1: LeNet-5 on MNIST, 0.74% error


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A LeNet-5-style CNN: conv-relu-pool, conv-relu-pool, dense-relu, dense."""

    kernel: int
    padding: str  # "SAME" for 8x8 digits, "VALID" (as LeNet-5) for 28x28
    conv: tuple[int, int]
    fc: int
    classes: int = 10


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str
    model: ModelConfig
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


DEFAULTS = {
    # 1,438 training images of 8x8: small kernels and SAME padding (the digits are tiny).
    "digits": dict(
        model=ModelConfig(kernel=3, padding="SAME", conv=(16, 32), fc=64),
        train_steps=1000,
        batch_size=64,
        lr=2e-3,
        finetune_steps=50,
        finetune_lr=1e-3,
        chunk=50,
        eval_batch=512,
    ),
    # LeNet-5's 6 and 16 5x5 filters (LeCun et al. 1998); one hidden FC layer of 256.
    "mnist-format": dict(
        model=ModelConfig(kernel=5, padding="VALID", conv=(6, 16), fc=256),
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
        "--write-readme",
        action="store_true",
        help="replace the text between this dataset's README markers",
    )
    p.add_argument("--readme", default=str(REPO / "README.md"))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="recompute nothing: re-render tables, plots and the README section from "
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
    for name in ("train_steps", "batch_size", "lr", "finetune_steps", "finetune_lr"):
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


# ---------------------------------------------------------------------------------------------
# The model: pure functions on a params dict


@partial(jax.jit, static_argnums=(1, 2))
def init_params(key: jax.Array, m: ModelConfig, image_shape: tuple[int, ...]) -> dict:
    h, w, c = image_shape
    for _ in range(2):
        if m.padding == "VALID":
            h, w = h - m.kernel + 1, w - m.kernel + 1
        h, w = h // 2, w // 2
    flat = h * w * m.conv[1]
    k1, k2, k3, k4 = jax.random.split(key, 4)

    def he(k, shape, fan_in):
        return jax.random.normal(k, shape, jnp.float32) * math.sqrt(2.0 / fan_in)

    kk = m.kernel * m.kernel
    return {
        "conv1": {
            "kernel": he(k1, (m.kernel, m.kernel, c, m.conv[0]), kk * c),
            "bias": jnp.zeros(m.conv[0]),
        },
        "conv2": {
            "kernel": he(k2, (m.kernel, m.kernel, m.conv[0], m.conv[1]), kk * m.conv[0]),
            "bias": jnp.zeros(m.conv[1]),
        },
        "fc1": {"kernel": he(k3, (flat, m.fc), flat), "bias": jnp.zeros(m.fc)},
        "fc2": {"kernel": he(k4, (m.fc, m.classes), m.fc) * 0.5, "bias": jnp.zeros(m.classes)},
    }


def _conv(x, layer, padding):
    y = lax.conv_general_dilated(
        x, layer["kernel"], (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + layer["bias"]


def _pool(x):
    # 2x2 max pooling by reshape: on CPU its gradient is ~2x cheaper than reduce_window's.
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def features(params, x, padding):
    """The convolutional trunk, flattened: what the FC layers see."""
    x = _pool(jax.nn.relu(_conv(x, params["conv1"], padding)))
    x = _pool(jax.nn.relu(_conv(x, params["conv2"], padding)))
    return x.reshape(x.shape[0], -1)


def head(params, h):
    h = jax.nn.relu(h @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    return h @ params["fc2"]["kernel"] + params["fc2"]["bias"]


def loss_fn(params, x, y, padding):
    logits = head(params, features(params, x, padding))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def prunable_tree(params: dict, setting: str) -> dict:
    """Which leaves may be pruned: FC kernels ("fc") or every kernel ("all")."""
    return {
        layer: {
            name: bool(name == "kernel" and (setting == "all" or layer.startswith("fc")))
            for name in leaves
        }
        for layer, leaves in params.items()
    }


# ---------------------------------------------------------------------------------------------
# Jitted building blocks. Masks, learning rates and data are arguments, never closures, so that
# each function compiles once for the whole sweep.


def make_optimizer(lr, mask):
    return optax.chain(optax.adam(lr), fisher_optax.keep_pruned(mask))


@partial(jax.jit, static_argnames=("padding",))
def init_opt_state(params, mask, *, padding):
    del padding
    return make_optimizer(1.0, mask).init(params)


@partial(jax.jit, static_argnames=("padding", "steps", "batch_size"))
def train_chunk(params, opt_state, mask, lr, key, x, y, *, padding, steps, batch_size):
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
        loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx], padding)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = lax.scan(step, (params, opt_state), jax.random.split(key, steps))
    return params, opt_state, losses.mean()


def _batched_correct(fn, params, x, y, batch):
    n = x.shape[0]
    pad = (-n) % batch
    x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    y = jnp.concatenate([y, jnp.full((pad,), -1, y.dtype)])  # -1 never equals an argmax
    xs = x.reshape(-1, batch, *x.shape[1:])
    ys = y.reshape(-1, batch)
    correct = lax.map(lambda b: jnp.sum(jnp.argmax(fn(params, b[0]), -1) == b[1]), (xs, ys))
    return correct.sum() / n


@partial(jax.jit, static_argnames=("padding", "batch"))
def accuracy(params, mask, x, y, *, padding, batch):
    """Test accuracy of ``apply_mask(params, mask)``."""
    params = fisher_optax.apply_mask(params, mask)
    return _batched_correct(lambda p, b: head(p, features(p, b, padding)), params, x, y, batch)


@partial(jax.jit, static_argnames=("padding", "batch"))
def trunk_features(params, x, *, padding, batch):
    n = x.shape[0]
    pad = (-n) % batch
    x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    h = lax.map(lambda b: features(params, b, padding), x.reshape(-1, batch, *x.shape[1:]))
    return h.reshape(-1, h.shape[-1])[:n]


@partial(jax.jit, static_argnames=("batch",))
def head_accuracy(params, mask, h, y, *, batch):
    """Accuracy from cached trunk features: exact when only FC weights are pruned."""
    return _batched_correct(head, fisher_optax.apply_mask(params, mask), h, y, batch)


@partial(jax.jit, static_argnames=("batch_size",))
def read_fisher(opt_state, *, batch_size):
    return fisher_optax.fisher_from_state(opt_state, batch_size=batch_size)


@jax.jit
def method_scores(params, fisher, key):
    """Each criterion's score pytree (larger keeps); two_stage ranks by F after its stage one.

    The random scores are ``random_mask``'s own: one uniform stream per leaf,
    ``jax.random.fold_in(key, i)``.
    """
    leaves, treedef = jax.tree.flatten(params)
    rand = [jax.random.uniform(jax.random.fold_in(key, i), x.shape) for i, x in enumerate(leaves)]
    return {
        "magnitude": jax.tree.map(jnp.abs, params),
        "fisher": fisher,
        "saliency": jax.tree.map(lambda f, w: 0.5 * f * jnp.square(w), fisher, params),
        "two_stage": fisher,
        "random": jax.tree.unflatten(treedef, rand),
    }


@partial(jax.jit, static_argnames=("scope",))
def select_mask(params, scores, sparsity, magnitude_sparsity, prunable, *, scope="global"):
    """Stage one by magnitude, stage two by ``scores``, exactly as ``two_stage_mask``.

    With ``magnitude_sparsity = 0`` stage one prunes nothing and this is ``topk_mask``: the
    magnitude, Fisher, saliency and random masks are ``magnitude_mask``, ``fisher_mask``
    (criterion "fisher" / "saliency") and ``random_mask``. One compiled selection serves every
    criterion, sparsity and setting (``prunable`` is a traced bool pytree), instead of one
    compilation per criterion and setting; tests/test_reproduce.py checks it equals the named
    functions.
    """
    kw = dict(scope=scope, prunable=prunable)
    stage1 = fisher_optax.magnitude_mask(params, magnitude_sparsity, **kw)
    return fisher_optax.topk_mask(scores, sparsity, mask=stage1, **kw)


def all_masks(params, fisher, sparsity, magnitude_fraction, key, setting, scope="global"):
    """The five criteria's masks at one sparsity, pruning the kernels of ``setting``."""
    # NumPy constants, not jnp ops: every eager jnp op costs a compilation of its own.
    prunable = jax.tree.map(
        lambda x, f: np.full(x.shape, f), params, prunable_tree(params, setting)
    )
    scores = method_scores(params, fisher, key)
    sp = jnp.float32(sparsity)
    return {
        m: select_mask(
            params,
            scores[m],
            sp,
            sp * magnitude_fraction if m == "two_stage" else jnp.float32(0.0),
            prunable,
            scope=scope,
        )
        for m in METHODS
    }


# ---------------------------------------------------------------------------------------------
# The experiment


def ones_mask(params):
    return jax.tree.map(lambda x: np.ones(x.shape, bool), params)


def n_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def quantize_all(cfg: Config, params, mask, fisher, evaluate, tmpdir: Path) -> dict:
    """Every quantizer at every average bit width: accuracy, file bytes, ratio, mean bits."""
    out: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in QUANT_METHODS}
    dense_bytes = 4 * n_params(params)
    params = jax.tree.map(np.asarray, params)
    mask = jax.tree.map(np.asarray, mask)
    fisher = jax.tree.map(np.asarray, fisher)
    init = cfg.kmeans_init
    for b in cfg.bits:
        for qm in QUANT_METHODS:
            if qm == "uniform":
                q = fisher_optax.quantize(params, b, mask=mask, method="uniform")
            elif qm == "kmeans":
                q = fisher_optax.quantize(params, b, mask=mask, method="kmeans", init=init)
            elif qm == "fisher_kmeans":
                q = fisher_optax.quantize(
                    params, b, fisher=fisher, mask=mask, method="kmeans", init=init
                )
            else:
                kw = {"bit_widths": cfg.bit_widths} if cfg.bit_widths else {}
                bits = fisher_optax.allocate_bits(fisher, mask=mask, average_bits=b, **kw)
                bits = jax.tree.map(np.asarray, bits)
                q = fisher_optax.quantize(
                    params, bits, fisher=fisher, mask=mask, method="kmeans", init=init
                )
            path = tmpdir / f"{qm}_{b}.fz"
            fisher_optax.save_compressed(path, q)
            size = path.stat().st_size
            report = fisher_optax.compression_report(q)
            qbits = np.concatenate([np.asarray(x).reshape(-1) for x in q.bits])
            out[qm][str(b)] = {
                "acc": float(evaluate(dequantize_jit(q))),
                "bytes": int(size),
                "ratio": dense_bytes / size,
                "avg_bits": float(qbits[qbits > 0].mean()) if (qbits > 0).any() else 0.0,
                "widths": sorted({int(w) for ws in q.widths for w in ws}),
                "report_bytes": _report_bytes(report),
                "sections": _sections(report),
            }
            path.unlink()
    return out


def _report_bytes(report: Any) -> int | None:
    """The byte count compression_report gives, if it says (it should equal the file)."""
    if isinstance(report, dict):
        for key in ("bytes", "total_bytes", "file_bytes"):
            if key in report:
                return int(report[key])
    return None


def _sections(report: Any) -> dict[str, int]:
    """Bytes per section of the file (codes, positions, codebooks, ...), summed over leaves."""
    out: dict[str, int] = {}
    if isinstance(report, dict):
        for leaf in report.get("leaves", []):
            for k in ("header", "codebooks", "positions", "width_map", "codes"):
                if isinstance(leaf.get(f"{k}_bytes"), int):
                    out[k] = out.get(k, 0) + leaf[f"{k}_bytes"]
        if isinstance(report.get("header_bytes"), int):
            out["file_header"] = report["header_bytes"]
    return out


@jax.jit
def dequantize_jit(q):
    return fisher_optax.dequantize(q)


def prune_phase(cfg: Config, data: datasets.Dataset, seed: int, dev) -> tuple[dict, tuple]:
    """Train, read the Fisher, prune with every criterion, fine-tune; the quantization base."""
    t_phase = time.perf_counter()
    m = cfg.model
    pad = m.padding
    x_train, y_train, x_test, y_test = dev
    key = jax.random.key(seed)
    k_init, k_train, k_rand, k_ft = jax.random.split(key, 4)
    params = init_params(k_init, m, tuple(data.x_train.shape[1:]))
    dense_mask = ones_mask(params)
    opt_state = init_opt_state(params, dense_mask, padding=pad)
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
            padding=pad,
            steps=cfg.chunk,
            batch_size=cfg.batch_size,
        )
        bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    train_time = time.perf_counter() - t0

    def evaluate(p, mask=dense_mask):
        return float(accuracy(p, mask, x_test, y_test, padding=pad, batch=cfg.eval_batch))

    dense_acc = evaluate(params)
    fisher = read_fisher(opt_state, batch_size=cfg.batch_size)
    h_test = trunk_features(params, x_test, padding=pad, batch=cfg.eval_batch)
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
        prunable = prunable_tree(params, setting)
        for meth in METHODS:
            mask = masks[meth]
            if setting == "fc":  # the trunk is untouched: reuse its test features
                acc0 = float(head_accuracy(params, mask, h_test, y_test, batch=cfg.eval_batch))
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
                padding=pad,
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
                    "prunable": rep["sparsity"],
                    "of_all_params": 1 - kept / n_params(params),
                    "per_leaf": {k: v["sparsity"] for k, v in rep["leaves"].items()},
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
            accuracy(p, ones, x_test, y_test, padding=cfg.model.padding, batch=cfg.eval_batch)
        )

    t0 = time.perf_counter()
    out = quantize_all(cfg, ft_params, mask, ft_fisher, evaluate, tmpdir)
    return {"quantization": out, "quantization_time_s": time.perf_counter() - t0}


# Bump when a change alters what the pruning phase computes, to invalidate --cache-dir.
_CACHE_VERSION = 2


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
            like = init_params(jax.random.key(0), cfg.model, tuple(data.x_train.shape[1:]))
            like = jax.tree.map(np.asarray, like)
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


# ---------------------------------------------------------------------------------------------
# Statistics, tables, reading


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(cfg: Config, runs: list[dict]) -> dict:
    """Means, stds and paired differences against magnitude, per setting and sparsity."""
    s: dict[str, Any] = {"dense_acc": mean_std([r["dense_acc"] for r in runs])}
    s["pruning"] = {}
    for setting in SETTINGS:
        s["pruning"][setting] = {}
        for ft in ("no_ft", "ft"):
            tab = {}
            for sp in cfg.sparsities:
                k = f"{sp:g}"
                mag = np.array([r["pruning"][setting]["magnitude"][ft][k] for r in runs])
                row = {}
                for meth in METHODS:
                    a = np.array([r["pruning"][setting][meth][ft][k] for r in runs])
                    d = a - mag
                    row[meth] = {
                        "mean": float(a.mean()),
                        "std": mean_std(a)[1],
                        "diff_vs_magnitude": float(d.mean()),
                        "diff_std": mean_std(d)[1],
                    }
                tab[k] = row
            s["pruning"][setting][ft] = tab
    s["quantization"] = {}
    for qm in QUANT_METHODS:
        s["quantization"][qm] = {}
        for b in cfg.bits:
            cells = [r["quantization"][qm][str(b)] for r in runs]
            acc = mean_std([c["acc"] for c in cells])
            size = mean_std([c["bytes"] for c in cells])
            ratio = mean_std([c["ratio"] for c in cells])
            s["quantization"][qm][str(b)] = {
                "avg_bits": float(np.mean([c["avg_bits"] for c in cells])),
                "acc": acc[0],
                "acc_std": acc[1],
                "bytes": size[0],
                "ratio": ratio[0],
                "ratio_std": ratio[1],
            }
    s["quant_base_acc"] = mean_std([r["quant_base_acc"] for r in runs])
    return s


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (bytes, acc, label) that no other point beats in both size and accuracy."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _compare(tab: dict, meth: str, n_seeds: int) -> tuple[list, list, list]:
    """Sparsities where ``meth`` beats, loses to, or ties with magnitude, beyond noise.

    Noise: twice the std over seeds of the paired difference (one network per seed, pruned
    both ways), or half a point with a single seed.
    """
    wins, losses, ties = [], [], []
    for k, row in tab.items():
        d, sd = row[meth]["diff_vs_magnitude"], row[meth]["diff_std"]
        tag = f"{float(k) * 100:g}% ({100 * d:+.1f} ± {100 * sd:.1f})"
        noise = 2 * sd if n_seeds > 1 else 0.005
        (wins if d > noise else losses if d < -noise else ties).append(tag)
    return wins, losses, ties


def _setting_label(cfg: Config, setting: str, ft: str) -> str:
    where = "FC layers" if setting == "fc" else "all layers"
    when = "no fine-tuning" if ft == "no_ft" else f"{cfg.finetune_steps} fine-tuning steps"
    return f"{where}, {when}"


def reading(cfg: Config, s: dict, n_seeds: int) -> list[str]:
    """The honest reading, generated from the numbers."""
    lines = []
    dense, dense_sd = s["dense_acc"]
    lines.append(
        f"Dense accuracy {pct(dense)} ± {pct(dense_sd)} % over {n_seeds} seed"
        f"{'s' if n_seeds > 1 else ''}. Differences to magnitude pruning are paired (the same "
        "trained network per seed, pruned both ways), in points, as mean ± std over seeds; "
        "a difference counts only when it exceeds twice that std"
        + (" (with one seed: half a point)." if n_seeds == 1 else ".")
    )
    # The paper's claim: two-stage beats magnitude at equal sparsity on the FC layers.
    claim = []
    for ft in ("no_ft", "ft"):
        w, lo, t = _compare(s["pruning"]["fc"][ft], "two_stage", n_seeds)
        when = "without fine-tuning" if ft == "no_ft" else "after fine-tuning"
        claim.append(f"{when}, better at {len(w)}, worse at {len(lo)}, within noise at {len(t)}")
    lines.append(
        "**The paper's claim** (magnitude then Fisher beats magnitude alone at the same "
        f"sparsity of the FC layers), over {len(cfg.sparsities)} sparsities: "
        + "; ".join(claim)
        + "."
    )
    for setting in SETTINGS:
        for ft in ("no_ft", "ft"):
            tab = s["pruning"][setting][ft]
            parts = []
            for meth in ("two_stage", "fisher", "saliency"):
                wins, losses, ties = _compare(tab, meth, n_seeds)
                bits = []
                if wins:
                    bits.append("better at " + ", ".join(wins))
                if losses:
                    bits.append("worse at " + ", ".join(losses))
                if ties:
                    bits.append("within noise at " + ", ".join(ties))
                parts.append(f"**{meth}** " + "; ".join(bits))
            spread = [100 * row["magnitude"]["std"] for row in tab.values()]
            lines.append(
                f"*{_setting_label(cfg, setting, ft)}*, against magnitude: "
                + ". ".join(parts)
                + f". (Magnitude's own spread over seeds: {min(spread):.1f} to "
                f"{max(spread):.1f} points.)"
            )
    # The highest sparsity each criterion reaches within one point of the dense accuracy.
    for setting in SETTINGS:
        best = []
        for meth in METHODS:
            ok = [
                float(k)
                for k, row in s["pruning"][setting]["ft"].items()
                if row[meth]["mean"] >= dense - 0.01
            ]
            best.append(f"{meth} {max(ok):.0%}" if ok else f"{meth} none")
        lines.append(
            f"Highest sparsity within 1 point of dense ({_setting_label(cfg, setting, 'ft')}): "
            + ", ".join(best)
            + "."
        )
    # Best compression within one point of the dense accuracy.
    points = []
    for qm in QUANT_METHODS:
        for b, c in s["quantization"][qm].items():
            points.append((c["ratio"], c["acc"], qm, b, c["bytes"]))
    ok = [p for p in points if p[1] >= dense - 0.01]
    where = "all layers" if cfg.quant_setting == "all" else "FC layers"
    if ok:
        r, a, qm, b, size = max(ok, key=lambda p: p[0])
        lines.append(
            f"Best compression within 1 point of the dense accuracy: **{r:.1f}x** "
            f"({size / 1024:.1f} KiB, accuracy {pct(a)} %) with {qm} at {b} average bits on "
            f"the {cfg.quant_method} model pruned to {cfg.quant_sparsity:.0%} ({where}) and "
            f"fine-tuned. Deep Compression reports {DEEP_COMPRESSION_LENET5:.0f}x for LeNet-5 "
            "on MNIST (Han et al. 2016). Not comparable one to one: another dataset "
            f"({cfg.dataset}), a far smaller network (fewer redundant weights: Deep "
            "Compression's LeNet-5 has 431k parameters, 93% of them in one FC layer), one "
            "global sparsity instead of a tuned per-layer schedule, short fine-tuning, no "
            "Huffman coding, and this file counts every byte (header, codebooks, positions)."
        )
    else:
        lines.append(
            "No quantized model stays within 1 point of the dense accuracy (the pruned model "
            f"before quantization: {pct(s['quant_base_acc'][0])} %)."
        )
    qwin = []
    for b in cfg.bits:
        accs = {qm: s["quantization"][qm][str(b)]["acc"] for qm in QUANT_METHODS}
        order = sorted(accs, key=accs.get, reverse=True)
        fb = s["quantization"]["fisher_bits"][str(b)].get("avg_bits")
        note = f"; fisher_bits used {fb:.2f} bits" if fb is not None else ""
        qwin.append(
            f"{b} bits: {order[0]} {pct(accs[order[0]])} % > {order[1]} "
            f"{pct(accs[order[1]])} %{note}"
        )
    lines.append("Most accurate quantizers per average bit budget: " + "; ".join(qwin) + ".")
    bigger = [
        f"{b} bits ({s['quantization']['fisher_bits'][str(b)]['ratio']:.1f}x vs "
        f"{s['quantization']['kmeans'][str(b)]['ratio']:.1f}x)"
        for b in cfg.bits
        if s["quantization"]["fisher_bits"][str(b)]["ratio"]
        < 0.98 * s["quantization"]["kmeans"][str(b)]["ratio"]
    ]
    if bigger:
        lines.append(
            "Mixed widths cost file space: at " + ", ".join(bigger) + " fisher_bits' file is "
            "larger than one-width k-means' although its mean bits are not higher, because it "
            "also stores which width each weight has and one codebook per width."
        )
    return lines


def pruning_table(cfg: Config, s: dict, setting: str, ft: str) -> list[list[str]]:
    rows = [["sparsity", *METHODS]]
    for sp in cfg.sparsities:
        k = f"{sp:g}"
        row = s["pruning"][setting][ft][k]
        best = max(row[m]["mean"] for m in METHODS)
        cells = []
        for m in METHODS:
            c = f"{pct(row[m]['mean'])} ± {pct(row[m]['std'])}"
            cells.append(f"**{c}**" if row[m]["mean"] == best else c)
        rows.append([f"{sp:.0%}", *cells])
    return rows


def quant_table(cfg: Config, s: dict) -> list[list[str]]:
    rows = [["avg bits", *[f"{qm} acc / ratio" for qm in QUANT_METHODS]]]
    for b in cfg.bits:
        cells = []
        for qm in QUANT_METHODS:
            c = s["quantization"][qm][str(b)]
            cell = f"{pct(c['acc'])} ± {pct(c['acc_std'])} / {c['ratio']:.1f}x"
            if qm == "fisher_bits":
                cell += f" ({c['avg_bits']:.2f} b)"
            cells.append(cell)
        rows.append([str(b), *cells])
    return rows


def markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def plain(rows: list[list[str]]) -> str:
    strip = [[c.replace("**", "") for c in r] for r in rows]
    widths = [max(len(r[i]) for r in strip) for i in range(len(strip[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in strip)


# ---------------------------------------------------------------------------------------------
# Plots


def plot_sparsity(cfg: Config, s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True, sharey=True)
    xs = np.array(cfg.sparsities) * 100
    for i, setting in enumerate(SETTINGS):
        for j, ft in enumerate(("no_ft", "ft")):
            ax = axes[i, j]
            for meth in METHODS:
                rows = [s["pruning"][setting][ft][f"{sp:g}"][meth] for sp in cfg.sparsities]
                mu = np.array([r["mean"] for r in rows]) * 100
                sd = np.array([r["std"] for r in rows]) * 100
                ax.errorbar(xs, mu, yerr=sd, marker="o", ms=3, capsize=2, label=meth)
            ax.axhline(s["dense_acc"][0] * 100, color="k", ls=":", lw=1, label="dense")
            ax.set_title(
                f"{'FC layers' if setting == 'fc' else 'all layers'} pruned, "
                + ("no fine-tuning" if ft == "no_ft" else f"{cfg.finetune_steps} fine-tune steps")
            )
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel("sparsity of the pruned kernels (%)")
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{cfg.dataset}: accuracy vs sparsity (mean ± std over {len(cfg.seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(cfg: Config, s: dict, dense_bytes: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = []
    for qm in QUANT_METHODS:
        cs = [s["quantization"][qm][str(b)] for b in cfg.bits]
        kb = np.array([c["bytes"] for c in cs]) / 1024
        acc = np.array([c["acc"] for c in cs]) * 100
        ax.errorbar(
            kb,
            acc,
            yerr=np.array([c["acc_std"] for c in cs]) * 100,
            marker="o",
            ms=4,
            capsize=2,
            label=qm,
        )
        for b, x, y in zip(cfg.bits, kb, acc, strict=True):
            ax.annotate(str(b), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
            points.append((x, y, qm))
    front = pareto(points)
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
    dense = s["dense_acc"][0] * 100
    ax.scatter([dense_bytes / 1024], [dense], marker="*", s=120, color="k", label="dense float32")
    ax.axhline(dense - 1, color="gray", ls=":", lw=1, label="dense - 1 point")
    ax.set_xscale("log")
    plain_number = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain_number)
    ax.xaxis.set_minor_formatter(plain_number)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("compressed file size (KiB, log scale; labels: average bits)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        f"{cfg.dataset}: {cfg.quant_method} pruned to {cfg.quant_sparsity:.0%} "
        f"({cfg.quant_setting} layers), fine-tuned, then quantized"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# README


def readme_section(
    cfg: Config, s: dict, lines: list[str], command: str, record: dict, meta: dict
) -> str:
    wall, cached = record["wall_time_s"], record.get("cached_prune_time_s", 0.0)
    auto = cfg.quant_sparsity_auto
    when = f"{meta['started_utc']}, " if "started_utc" in meta else ""
    if cached:
        timing = (
            f"measured time {(wall + cached) / 60:.1f} min in all: {cached / 60:.1f} min of "
            f"pruning phases stored in `--cache-dir` when they ran, {wall / 60:.1f} min for the "
            "final invocation"
        )
    else:
        timing = f"wall time {wall / 60:.1f} min"
    if "cpu_time_s" in record:
        timing += f" (CPU time of the process {record['cpu_time_s'] / 60:.1f} min)"
    out = [
        f"Command: `{command}` — {timing} ({when}{meta['machine']}, shared with other jobs; "
        f"jax {meta['jax']} on {meta['backend']}), {len(cfg.seeds)} seeds, jit compilation "
        "included.",
        "",
        f"Model: conv {cfg.model.kernel}x{cfg.model.kernel}x{cfg.model.conv[0]} → pool → conv "
        f"{cfg.model.kernel}x{cfg.model.kernel}x{cfg.model.conv[1]} → pool → dense "
        f"{cfg.model.fc} → dense {cfg.model.classes} ({meta['n_params']:,} parameters, "
        f"{meta['n_prunable']['fc']:,} in FC kernels). Adam lr {cfg.lr}, batch "
        f"{cfg.batch_size}, {cfg.train_steps} steps; Fisher = bias-corrected Adam `nu` × batch "
        f"size. Pruning is one-shot and {cfg.scope}; fine-tuning: {cfg.finetune_steps} Adam "
        f"steps at lr {cfg.finetune_lr} with `keep_pruned`. two_stage prunes "
        f"{cfg.magnitude_fraction:.0%} of the target by magnitude, the rest by Fisher. "
        "Quantizers, per layer and at the same average bits per kept weight: uniform "
        "(evenly spaced grid), kmeans (weight sharing, kmeans_1d init "
        f"{cfg.kmeans_init or 'dp'}), fisher_kmeans (the same, weighted by the Fisher), "
        "fisher_bits (the paper: `allocate_bits` gives more bits to weights of higher "
        f"Fisher, widths {list(cfg.bit_widths) or [8, 6, 4, 2]}, then Fisher-weighted k-means).",
        "",
    ]
    for setting in SETTINGS:
        for ft in ("no_ft", "ft"):
            what = "the FC kernels" if setting == "fc" else "all kernels"
            when = "no fine-tuning" if ft == "no_ft" else "fine-tuned"
            title = f"Accuracy (%) after pruning {what}, {when}"
            out += [
                f"**{title}** (mean ± std; best in bold)",
                "",
                markdown(pruning_table(cfg, s, setting, ft)),
                "",
            ]
    out += [
        f"**Quantization** of the fine-tuned {cfg.quant_method} model at {cfg.quant_sparsity:.0%} "
        f"({cfg.quant_setting} layers"
        + (
            "; chosen as the highest sparsity within 1 point of dense, else the lowest"
            if auto
            else ""
        )
        + f"; float accuracy {pct(s['quant_base_acc'][0])} %): "
        "accuracy (%) / compression vs float32 dense, from the size of the file "
        "`save_compressed` writes.",
        "",
        markdown(quant_table(cfg, s)),
        "",
        "**Reading** (generated from the numbers above):",
        "",
        *[f"- {line}" for line in lines],
        "",
        f"Plots: `{meta['plots'][0]}`, `{meta['plots'][1]}`; every number: `{meta['json']}`.",
    ]
    return "\n".join(out)


def write_readme(readme: Path, dataset: str, text: str) -> bool:
    begin, end = f"<!-- results:{dataset}:begin -->", f"<!-- results:{dataset}:end -->"
    if not readme.is_file():
        print(f"README {readme} not found: results section not written.")
        return False
    src = readme.read_text()
    if src.count(begin) != 1 or src.count(end) != 1 or src.index(begin) > src.index(end):
        print(f"README {readme} lacks one pair of {begin} / {end}: section not written.")
        return False
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    readme.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", src))
    print(f"Wrote the results section between {begin} and {end} in {readme}.")
    return True


# ---------------------------------------------------------------------------------------------


def config_from_dict(d: dict) -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
    model = dict(d.pop("model"))
    model["conv"] = tuple(model["conv"])
    return Config(model=ModelConfig(**model), **d)


def compute(args: argparse.Namespace, argv: list[str]) -> dict:
    """Run every seed; return the record that ``render`` reports and ``--render-only`` reads."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    cfg = make_config(args)
    data = load_data(args)
    dev = tuple(jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test))
    probe = init_params(jax.random.key(0), cfg.model, tuple(data.x_train.shape[1:]))
    flags = {s: jax.tree.leaves(prunable_tree(probe, s)) for s in SETTINGS}
    meta = {
        "n_params": n_params(probe),
        "n_prunable": {
            s: sum(x.size for x, f in zip(jax.tree.leaves(probe), flags[s], strict=True) if f)
            for s in SETTINGS
        },
        "jax": jax.__version__,
        "optax": optax.__version__,
        "fisher_optax": fisher_optax.__version__,
        "backend": jax.default_backend(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"
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
            f"seed {seed}: dense accuracy {pct(r['dense_acc'])} %, trained in "
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
    """The run's argv, plus the quantization flags whose defaults have changed since it ran."""
    argv = list(record["config"]["argv"])
    defaults = build_parser().parse_args([])
    if "--bits" not in argv and tuple(cfg.bits) != tuple(defaults.bits):
        argv += ["--bits", ",".join(str(b) for b in cfg.bits)]
    if "--quant-sparsity" not in argv and not cfg.quant_sparsity_auto:
        argv += ["--quant-sparsity", f"{cfg.quant_sparsity:g}"]
    init = cfg.kmeans_init or "dp"
    if "--kmeans-init" not in argv and init != defaults.kmeans_init:
        argv += ["--kmeans-init", init]
    return argv


def render(record: dict, args: argparse.Namespace, out_dir: Path) -> dict:
    """Summaries, tables, reading, plots, JSON and (with --write-readme) the README section."""
    cfg = config_from_dict(record["config"])
    runs, meta = record["runs"], record["meta"]
    s = summarize(cfg, runs)
    lines = reading(cfg, s, len(runs))
    stem = cfg.dataset
    json_path = out_dir / f"{stem}.json"
    png1, png2 = out_dir / f"{stem}_sparsity.png", out_dir / f"{stem}_pareto.png"
    meta["plots"] = [str(png1), str(png2)]
    meta["json"] = str(json_path)
    for setting in SETTINGS:
        for ft in ("no_ft", "ft"):
            when = "no fine-tuning" if ft == "no_ft" else "fine-tuned"
            print(f"\naccuracy (%) — {setting} kernels pruned, {when}:")
            print(plain(pruning_table(cfg, s, setting, ft)))
    print(
        f"\nquantization of {cfg.quant_method} at {cfg.quant_sparsity:.0%} "
        f"({cfg.quant_setting}): accuracy (%) / compression ratio"
    )
    print(plain(quant_table(cfg, s)))
    print()
    for line in lines:
        print("- " + line.replace("**", "").replace("*", ""))
    print(
        f"\nwall time {record['wall_time_s']:.0f} s, CPU time {record.get('cpu_time_s', 0):.0f} s"
    )
    if not args.no_plots:
        plot_sparsity(cfg, s, png1)
        plot_pareto(cfg, s, 4 * meta["n_params"], png2)
    record = {**record, "summary": s, "reading": lines}
    json_path.write_text(json.dumps(record, indent=1))
    print(f"wrote {json_path}" + ("" if args.no_plots else f", {png1}, {png2}"))
    if args.write_readme:
        command = " ".join(["python examples/reproduce.py", *equivalent_argv(cfg, record)])
        text = readme_section(cfg, s, lines, command, record, meta)
        write_readme(Path(args.readme), cfg.dataset, text)
    return record


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
    return render(record, args, out_dir)


if __name__ == "__main__":
    main()
