"""Accuracy against file size: entropy-constrained quantization against today's quantizers.

LeNet-300-100 is trained on Fashion-MNIST with Adam, then pruned while training with
``pruned(adam)`` (OBD saliency from Adam's ``nu``) to the last level of a staircase; that
model (its weights, mask and Fisher read from ``nu``) is cached under ``results/cache``,
keyed by the configuration and ``experiments.versions.code_version()``. Then each quantizer
writes the model with ``save_compressed`` at several settings, the file is loaded back with
``load_compressed`` and its accuracy is measured on the test set, with no fine-tuning:

- ``kmeans``: today's pipeline, ``allocate_bits(granularity="layer", average_bits=β)`` (one
  width per leaf from its saliency, ``entry_bits=40``) then Fisher-weighted k-means;
- ``uniform``: one width ``b`` for every kernel, evenly spaced levels, entropy coded by the
  file (Choi et al. 2017's uniform quantization with entropy coding);
- ``ecsq-fisher`` / ``ecsq``: ``quantize_to_target(..., prune_zero=True)``, with and without
  the Fisher as weights, at the sizes of the ``kmeans`` and ``uniform`` files (paired, equal
  size) and at fractions of the smallest of them.
- ``fisher-step`` / ``step``: ``quantize_to_target(..., method="fisher_step",
  prune_zero=True)`` at the same targets: a grid through 0 per kernel with the step
  ``sqrt(6 lam / (ln 2 * mean Fisher))`` (the Fisher as posterior precision), and its
  control with one step for every kernel (no Fisher).
- ``ecsq-fisher-rate``: ``ecsq-fisher``'s file ``q0`` at each of its targets, then a short
  fine-tuning of the weights on the loss plus ``mu * rate_penalty(params, q0, fisher=)``
  (``mu`` chosen on held-out training examples), then ``quantize_to_target`` at the same
  size; ``ecsq-fisher-ft``, its control, is the same fine-tuning without the penalty.

``python -m experiments.rate_distortion`` writes ``results/rate-distortion-<dataset>.json``;
``--write-docs`` also writes ``docs/results/rate-distortion.md``. ``--smoke`` runs a tiny
MLP on sklearn digits in seconds (the CI test); ``--no-rate-tuning`` leaves out the two
fine-tuned methods (most of the run's time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo
from experiments import datasets, models
from experiments.main_job import Cache, _key, _scan_steps, accuracy, make_trainer, staircase
from experiments.report import machine_words, markdown, mean_std, run_meta

REPO = Path(__file__).resolve().parents[1]
METHODS = (
    "kmeans",
    "uniform",
    "ecsq-fisher",
    "ecsq",
    "fisher-step",
    "step",
    "ecsq-fisher-ft",
    "ecsq-fisher-rate",
)
TARGETED = ("ecsq-fisher", "ecsq", "fisher-step", "step")  # at the same target sizes
BIT_WIDTHS = (8, 7, 6, 5, 4, 3, 2)  # allocate_bits' widths, as experiments/main_job.py
RATE_FIELDS = (
    "rate_steps",
    "rate_lr",
    "rate_mu",
    "held_out",
    "rate_at",
)  # not part of the training


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str = "fashion-mnist"
    hidden: tuple[int, ...] = (300, 100)
    seeds: int = 3
    dense_steps: int = 2400
    levels: tuple[float, ...] = (0.5, 0.8, 0.9, 0.94)
    ramp: int = 200
    hold: int = 200
    update_every: int = 25
    batch_size: int = 128
    lr: float = 1e-3
    prune_lr: float = 5e-4
    average_bits: tuple[float, ...] = (2.5, 3.0, 4.0, 5.0)
    uniform_bits: tuple[int, ...] = (3, 4, 5, 6)
    smaller: tuple[float, ...] = (0.6, 0.8)  # ECSQ also at these fractions of the smallest
    # Rate-aware fine-tuning of the weights before ECSQ-Fisher (and its control, the same
    # steps without the penalty): steps, Adam's learning rate, the prices mu of the
    # penalty tried, and the training examples held out to choose mu (the last ones).
    rate_steps: int = 300
    rate_lr: float = 2e-4
    rate_mu: tuple[float, ...] = (3.0, 10.0, 30.0)
    held_out: int = 5000
    rate_at: int | None = None  # fine-tune at the smallest this many targets (None: all)


SMOKE = Config(
    dataset="digits",
    hidden=(32, 16),
    seeds=1,
    dense_steps=200,
    levels=(0.5, 0.8),
    ramp=20,
    hold=20,
    update_every=10,
    batch_size=64,
    lr=3e-3,
    prune_lr=1e-3,
    average_bits=(3.0,),
    uniform_bits=(4,),
    smaller=(0.8,),
    rate_steps=20,
    rate_mu=(10.0,),
    held_out=200,
    rate_at=1,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.rate_distortion", description=__doc__)
    p.add_argument("--seeds", type=int, default=Config.seeds)
    p.add_argument("--smoke", action="store_true", help="tiny run on sklearn digits (seconds)")
    p.add_argument(
        "--no-rate-tuning",
        action="store_true",
        help="leave out ecsq-fisher-ft and ecsq-fisher-rate (the fine-tuning)",
    )
    p.add_argument("--out", default="results", help="directory of the JSON")
    p.add_argument("--cache-dir", default=None, help="default: <out>/cache")
    p.add_argument("--write-docs", action="store_true", help="write the docs page")
    p.add_argument("--docs-page", default=None, help="default: docs/results/rate-distortion.md")
    return p


def train(cfg: Config, data: datasets.Dataset, seed: int, cache: Cache) -> dict:
    """Dense Adam, then ``pruned(adam)`` by OBD saliency through ``cfg.levels``: the last
    level's params, mask and Fisher (cached)."""
    fields = dataclasses.asdict(cfg)
    for k in ("seeds", "average_bits", "uniform_bits", "smaller", *RATE_FIELDS):
        fields.pop(k)
    ck = _key("rate-distortion-train", fields, seed)
    hit = cache.get("rd-train", ck)
    if hit is not None:
        trees, info = hit
        mask = jax.tree.map(lambda m: m.astype(bool), trees["mask"])
        return {"params": trees["params"], "mask": mask, "fisher": trees["fisher"], **info}
    model = models.MLP(hidden=cfg.hidden)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    k_init, k_dense, k_prune = jax.random.split(jax.random.key(seed), 3)
    t0 = time.perf_counter()
    params = model.init(k_init, data.x_train.shape[1:])
    adam = optax.adam(cfg.lr)
    state = adam.init(params)
    params, state, _ = make_trainer(adam, model, cfg.dense_steps, cfg.batch_size)(
        params, state, k_dense, x, y
    )
    dense = _accuracy(params, data, model)
    opt = fo.pruned(
        optax.adam(cfg.prune_lr),
        staircase(cfg.levels, cfg.ramp, cfg.hold),
        criterion="saliency",
        method="one_stage",
        update_every=cfg.update_every,
    )
    pstate = opt.init(params)
    # Adam goes on from the dense run: its moments and count (the Fisher keeps its history).
    inner = pstate.inner_state
    pstate = pstate._replace(inner_state=(state[0], *inner[1:]))
    steps = len(cfg.levels) * (cfg.ramp + cfg.hold)
    params, pstate, _ = make_trainer(opt, model, steps, cfg.batch_size)(
        params, pstate, k_prune, x, y
    )
    fisher = fo.fisher_from_state(pstate.inner_state, batch_size=cfg.batch_size)
    mask = pstate.mask
    info = {
        "dense_accuracy": dense,
        "pruned_accuracy": _accuracy(params, data, model),
        "sparsity": float(fo.sparsity_report(mask).sparsity),
        "train_seconds": time.perf_counter() - t0,
    }
    cache.put("rd-train", ck, {"params": params, "mask": mask, "fisher": fisher}, info)
    return {"params": params, "mask": mask, "fisher": fisher, **info}


def _accuracy(params, data, model, *, held_out: int = 0) -> float:
    """Test accuracy, or with ``held_out=n`` the accuracy on the last ``n`` training
    examples (those that fine-tuning does not train on)."""
    if held_out:
        x, y = jnp.asarray(data.x_train[-held_out:]), jnp.asarray(data.y_train[-held_out:])
    else:
        x, y = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    return 100.0 * float(accuracy(params, x, y, model=model, batch=min(1000, x.shape[0])))


def fine_tune(cfg: Config, run: dict, q0: fo.QuantizedParams, mu: float, data, key) -> dict:
    """``cfg.rate_steps`` steps of Adam on the cross-entropy plus ``mu * rate_penalty(params,
    q0, fisher=)`` (``mu = 0``: the plain control) from the pruned model, on the training
    examples not held out, with every weight that ``q0`` does not code held at 0: the run
    dict of the fine-tuned params, that mask and the Fisher."""
    model = models.MLP(hidden=cfg.hidden)
    keep = jax.tree.unflatten(
        q0.treedef,
        [
            np.ones(shape, bool) if bits is None else np.asarray(bits) > 0
            for bits, shape in zip(q0.bits, q0.shapes, strict=True)
        ],
    )
    fisher = run["fisher"]
    n = data.x_train.shape[0] - cfg.held_out
    x, y = jnp.asarray(data.x_train[:n]), jnp.asarray(data.y_train[:n])
    params = _fine_tune_steps(
        fo.apply_mask(run["params"], keep), keep, q0, fisher, jnp.float32(mu), key, x, y,
        model=model, steps=cfg.rate_steps, batch_size=cfg.batch_size, lr=cfg.rate_lr,
    )  # fmt: skip
    return {"params": params, "mask": keep, "fisher": fisher}


@partial(jax.jit, static_argnames=("model", "steps", "batch_size", "lr"))
def _fine_tune_steps(params, keep, q0, fisher, mu, key, x, y, *, model, steps, batch_size, lr):
    """:func:`fine_tune`'s steps; ``q0`` and ``mu`` are arguments, so that one compile
    serves every ``mu`` (the penalty is computed and multiplied by 0 for the control)."""

    def loss(p, xb, yb):
        return models.loss_fn(model, p, xb, yb) + mu * fo.rate_penalty(p, q0, fisher=fisher)

    opt = optax.chain(optax.adam(lr), fo.keep_pruned(keep))
    params, _, _ = _scan_steps(opt, loss, params, opt.init(params), key, x, y, steps, batch_size)
    return params


def quantized(method: str, setting: float, run: dict) -> tuple[fo.QuantizedParams, dict]:
    """The :class:`~fisher_optax.QuantizedParams` of ``method`` at ``setting`` (average bits,
    bits, or target bytes)."""
    params, mask, fisher = run["params"], run["mask"], run["fisher"]
    if method == "kmeans":
        bits = fo.allocate_bits(
            params, fisher=fisher, mask=mask, average_bits=setting, granularity="layer",
            bit_widths=BIT_WIDTHS, entry_bits=40.0,
        )  # fmt: skip
        return fo.quantize(params, bits, fisher=fisher, mask=mask), {}
    if method == "uniform":
        return fo.quantize(params, int(setting), mask=mask, method="uniform"), {}
    q, lam = fo.quantize_to_target(
        params,
        size_bytes=setting,
        fisher=fisher if method.startswith(("ecsq-fisher", "fisher-step")) else None,
        mask=mask,
        prune_zero=True,
        method="fisher_step" if method.endswith("step") else "ecsq",
    )
    return q, {"lam": lam}


def measure(method, setting, run, data, model, *, held_out: int = 0) -> dict:
    """Quantize, write, read back, evaluate: one point of the frontier (with ``held_out``,
    also the accuracy on the held-out training examples)."""
    t0 = time.perf_counter()
    q, extra = quantized(method, setting, run)
    quantize_s = time.perf_counter() - t0
    report = fo.compression_report(q)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.foqz"
        size = fo.save_compressed(path, q)
        loaded = fo.dequantize(fo.load_compressed(path))
    coded = [leaf for leaf in report.leaves if leaf.quantized]
    split = {
        "positions": sum(leaf.positions.bytes for leaf in coded),
        "codes": sum(leaf.codes.bytes + leaf.width_map.bytes for leaf in coded),
        "codebooks": sum(leaf.codebook_bytes for leaf in coded),
        "raw": sum(leaf.bytes for leaf in report.leaves if not leaf.quantized),
    }
    layers = {
        leaf.path: {
            "kept": leaf.kept,
            "entries": int(sum(np.size(b) for b in q.codebooks[i].values())),
            "code_bits_per_kept": 8 * leaf.codes.bytes / max(leaf.kept, 1),
        }
        for i, leaf in enumerate(report.leaves)
        if leaf.quantized
    }
    return {
        "method": method,
        "setting": float(setting),
        "bytes": int(size),
        "ratio": report.dense_float32_bytes / size,
        "bits_per_param": 8 * size / report.weights,
        "kept": sum(leaf.kept for leaf in coded),
        "accuracy": _accuracy(loaded, data, model),
        "split": split,
        "layers": layers,
        "quantize_seconds": quantize_s,
        **(
            {"held_out_accuracy": _accuracy(loaded, data, model, held_out=held_out)}
            if held_out
            else {}
        ),
        **extra,
    }


def run_seed(cfg: Config, data: datasets.Dataset, seed: int, cache: Cache) -> dict:
    model = models.MLP(hidden=cfg.hidden)
    run = train(cfg, data, seed, cache)
    points = [measure("kmeans", b, run, data, model) for b in cfg.average_bits]
    points += [measure("uniform", b, run, data, model) for b in cfg.uniform_bits]
    baseline = sorted({p["bytes"] for p in points})
    targets = sorted({*baseline, *(round(f * baseline[0]) for f in cfg.smaller)})
    for method in TARGETED:
        points += [measure(method, t, run, data, model) for t in targets]
    candidates = []
    rate_targets = targets[: cfg.rate_at]
    for j, t in enumerate(rate_targets):
        q0, _ = quantized("ecsq-fisher", t, run)
        key = jax.random.fold_in(jax.random.key(seed), j)  # the same batches for every mu
        for mu in (0.0, *cfg.rate_mu):
            tuned = fine_tune(cfg, run, q0, mu, data, key)
            method = "ecsq-fisher-rate" if mu else "ecsq-fisher-ft"
            point = measure(method, t, tuned, data, model, held_out=cfg.held_out)
            (candidates if mu else points).append({**point, "mu": mu})
    # mu chosen per target on the held-out examples, never on the test set.
    for t in rate_targets:
        pick = [p for p in candidates if p["setting"] == t]
        points.append(max(pick, key=lambda p: p["held_out_accuracy"]))
    for p in points:
        print(
            f"seed {seed} {p['method']:>12} {p['setting']:>8g}: {p['bytes']:>7,} B "
            f"({p['ratio']:.0f}x) accuracy {p['accuracy']:.2f}%",
            flush=True,
        )
    info = {k: v for k, v in run.items() if k not in ("params", "mask", "fisher")}
    # Per kernel: kept weights and their mean Fisher (what ECSQ's one lam weighs).
    info["layers"] = {
        f"['{name}']['kernel']": {
            "kept": int(np.sum(run["mask"][name]["kernel"])),
            "mean_fisher": float(
                np.mean(np.asarray(run["fisher"][name]["kernel"])[run["mask"][name]["kernel"]])
            ),
        }
        for name in run["params"]
    }
    return {"seed": seed, **info, "points": points, "rate_candidates": candidates}


def paired(record: dict, baseline: str, method: str) -> list[float]:
    """Per seed and baseline point: accuracy of ``method`` at the baseline's file size
    minus the baseline's (points whose ECSQ file met the size within 2%)."""
    out = []
    for run in record["runs"]:
        ours = {p["setting"]: p for p in run["points"] if p["method"] == method}
        for p in run["points"]:
            q = ours.get(float(p["bytes"])) if p["method"] == baseline else None
            if q is not None and q["bytes"] >= 0.98 * p["bytes"]:
                out.append(q["accuracy"] - p["accuracy"])
    return out


def frontier_rows(record: dict) -> list[list[str]]:
    rows = [["method", "setting", "file (B)", "ratio", "bits/param", "accuracy (%)", "Δ dense"]]
    runs = record["runs"]
    dense = float(np.mean([r["dense_accuracy"] for r in runs]))
    for method in METHODS:
        settings = sorted({p["setting"] for p in runs[0]["points"] if p["method"] == method})
        for j, s in enumerate(settings):
            pts = [
                [p for p in r["points"] if p["method"] == method][j]
                for r in runs
                if len([p for p in r["points"] if p["method"] == method]) > j
            ]
            size, ratio = mean_std([p["bytes"] for p in pts]), mean_std([p["ratio"] for p in pts])
            acc = mean_std([p["accuracy"] for p in pts])
            label = {
                "kmeans": f"{s:g} bits avg",
                "uniform": f"{s:g} bits",
            }.get(method, f"target #{j + 1}")
            rows.append(
                [
                    method, label, f"{size[0]:,.0f}", f"{ratio[0]:.0f}x",
                    f"{np.mean([p['bits_per_param'] for p in pts]):.3f}",
                    f"{acc[0]:.2f} ± {acc[1]:.2f}", f"{acc[0] - dense:+.2f}",
                ]
            )  # fmt: skip
    return rows


def split_rows(record: dict) -> list[list[str]]:
    """The file split of each method's smallest file of seed 0."""
    rows = [["method", "file (B)", "positions", "codes", "codebooks", "raw leaves", "entries"]]
    run = record["runs"][0]
    for method in METHODS:
        mine = [p for p in run["points"] if p["method"] == method]
        if not mine:  # the fine-tuned methods, left out with --no-rate-tuning
            continue
        p = min(mine, key=lambda p: p["bytes"])
        s = p["split"]
        entries = ", ".join(str(v["entries"]) for v in p["layers"].values())
        parts = (f"{s[k]:,}" for k in ("positions", "codes", "codebooks", "raw"))
        rows.append([method, f"{p['bytes']:,}", *parts, entries])
    return rows


def layer_rows(record: dict) -> list[list[str]]:
    """Code bits per kept weight per layer, at the paired sizes of the kmeans points."""
    run = record["runs"][0]
    km = [p for p in run["points"] if p["method"] == "kmeans"]
    methods = ("ecsq-fisher", "fisher-step")
    ours = {m: {p["setting"]: p for p in run["points"] if p["method"] == m} for m in methods}
    paths = list(km[0]["layers"])
    rows = [["file (B)", *(f"{m} {k}" for m in ("kmeans", *methods) for k in paths)]]
    for p in km:
        at = [ours[m].get(float(p["bytes"])) for m in methods]
        if None in at:
            continue
        rows.append(
            [
                f"{p['bytes']:,}",
                *(f"{q['layers'][k]['code_bits_per_kept']:.2f}" for q in (p, *at) for k in paths),
            ]
        )
    return rows


def rate_rows(record: dict) -> list[list[str]]:
    """Per ECSQ target (mean ± std over seeds): test accuracy without fine-tuning, after the
    plain fine-tuning, after rate-aware fine-tuning at each mu and at the mu chosen on the
    held-out examples."""
    mus = record["config"]["rate_mu"]
    rows = [
        [
            "target", "file (B)", "ecsq-fisher", "+ fine-tuning",
            *(f"+ rate, mu={m:g}" for m in mus), "+ rate, mu chosen", "mu chosen",
        ]
    ]  # fmt: skip
    runs = record["runs"]
    targets = _rate_points(runs[0])

    def cell(values):
        m = mean_std(values)
        return f"{m[0]:.2f} ± {m[1]:.2f}"

    for j in range(len(targets)):
        by = [_rate_points(r)[j] for r in runs if len(_rate_points(r)) > j]
        size = np.mean([b["ecsq-fisher"]["bytes"] for b in by])
        rows.append(
            [
                f"#{j + 1}",
                f"{size:,.0f}",
                cell([b["ecsq-fisher"]["accuracy"] for b in by]),
                cell([b["ecsq-fisher-ft"]["accuracy"] for b in by]),
                *(cell([b[m]["accuracy"] for b in by]) for m in mus),
                cell([b["ecsq-fisher-rate"]["accuracy"] for b in by]),
                ", ".join(f"{b['ecsq-fisher-rate']['mu']:g}" for b in by),
            ]
        )
    return rows


def _rate_points(run: dict) -> list[dict]:
    """Per target of a run with rate-aware points, ascending: its points by method and mu."""
    out = []
    targets = sorted({p["setting"] for p in run["points"] if p["method"] == "ecsq-fisher-rate"})
    for t in targets:
        at = {p["method"]: p for p in run["points"] if p["setting"] == t}
        at.update({p["mu"]: p for p in run["rate_candidates"] if p["setting"] == t})
        out.append(at)
    return out


def rate_reading(record: dict) -> str:
    """Paired differences of test accuracy at the same target size, all seeds."""
    lines = []
    pairs = (
        ("ecsq-fisher-rate", "ecsq-fisher-ft", "rate-aware against plain fine-tuning"),
        ("ecsq-fisher-rate", "ecsq-fisher", "rate-aware fine-tuning against none"),
        ("ecsq-fisher-ft", "ecsq-fisher", "plain fine-tuning against none"),
    )
    for ours, base, words in pairs:
        for where in ("at every target", "below the baselines' sizes"):
            per_seed = []
            for run in record["runs"]:
                smallest = min(
                    p["bytes"] for p in run["points"] if p["method"] in ("kmeans", "uniform")
                )
                per_seed.append(
                    [
                        at[ours]["accuracy"] - at[base]["accuracy"]
                        for at in _rate_points(run)
                        if where == "at every target" or at[ours]["setting"] < smallest
                    ]
                )
            d = [v for seed in per_seed for v in seed]
            if d:
                wins = sum(v > 0 for v in d)
                seeds = ", ".join(f"{np.mean(v):+.2f}" for v in per_seed if v)
                lines.append(
                    f"- {words} (`{ours}` minus `{base}`), {where}: {np.mean(d):+.2f} points "
                    f"on average (min {min(d):+.2f}, max {max(d):+.2f}; ahead on {wins} of "
                    f"{len(d)} pairs; mean per seed {seeds})."
                )
    return "\n".join(lines)


def reading(record: dict) -> str:
    lines = []
    for base in ("kmeans", "uniform"):
        for method in TARGETED:
            d = paired(record, base, method)
            if not d:
                continue
            wins = sum(v > 0 for v in d)
            lines.append(
                f"- `{method}` against `{base}` at equal file size: accuracy difference "
                f"{np.mean(d):+.2f} points on average (min {min(d):+.2f}, max {max(d):+.2f}; "
                f"ahead on {wins} of {len(d)} paired points over {len(record['runs'])} seed(s))."
            )
    same_target = (
        ("ecsq-fisher", "ecsq", "Fisher weights in ECSQ"),
        ("fisher-step", "step", "Steps from the Fisher"),
        ("fisher-step", "ecsq-fisher", "Fisher steps against Fisher ECSQ"),
    )
    for ours, base, words in same_target:
        near, below = [], []  # at the baselines' sizes, and below the smallest of them
        for run in record["runs"]:
            smallest = min(
                p["bytes"] for p in run["points"] if p["method"] in ("kmeans", "uniform")
            )
            theirs = {p["setting"]: p["accuracy"] for p in run["points"] if p["method"] == base}
            for p in run["points"]:
                if p["method"] == ours and p["setting"] in theirs:
                    d = p["accuracy"] - theirs[p["setting"]]
                    (near if p["setting"] >= smallest else below).append(d)
        for d, where in ((near, "at the baselines' sizes"), (below, "below them")):
            if d:
                lines.append(
                    f"- {words} (`{ours}` minus `{base}`, same target) {where}: "
                    f"{np.mean(d):+.2f} points on average (min {min(d):+.2f}, max "
                    f"{max(d):+.2f}, {len(d)} pairs)."
                )
    run = record["runs"][0]
    smallest = min((p for p in run["points"] if p["method"] == "ecsq-fisher"), key=_bytes)
    base = min((p for p in run["points"] if p["method"] == "kmeans"), key=_bytes)
    lines.append(
        f"- Positions are {100 * base['split']['positions'] / base['bytes']:.0f}% of the "
        f"smallest `kmeans` file (seed 0). The smallest ECSQ targets are met by quantizing "
        f"weights to 0 with no retraining: `ecsq-fisher` keeps {smallest['kept']:,} of the "
        f"model's {sum(v['kept'] for v in run['layers'].values()):,} kernel weights at "
        f"{smallest['bytes']:,} B."
    )
    return "\n".join(lines)


def _bytes(p: dict) -> int:
    return p["bytes"]


def fisher_line(record: dict) -> str:
    layers = record["runs"][0]["layers"]
    return ", ".join(f"{k} {v['mean_fisher']:.3g} ({v['kept']:,} kept)" for k, v in layers.items())


def page(record: dict) -> str:
    cfg, runs, meta = record["config"], record["runs"], record["meta"]
    dense = mean_std([r["dense_accuracy"] for r in runs])
    pruned = mean_std([r["pruned_accuracy"] for r in runs])
    sparsity = np.mean([r["sparsity"] for r in runs])
    hidden = "-".join(str(h) for h in cfg["hidden"])
    return f"""# Results: accuracy against file size, entropy-constrained quantization

The MLP {record["input_size"]}-{hidden}-10 on {record["dataset"]} is trained with Adam, then
pruned while training with `pruned(adam)` (OBD saliency from Adam's `nu`) to
{100 * sparsity:.1f}% sparsity of its kernels. Each quantizer then writes that model with
`save_compressed`; the file is read back with `load_compressed` and its test accuracy is
measured, with no fine-tuning of the codebooks:

- `kmeans`: `allocate_bits(granularity="layer", average_bits=β, entry_bits=40)` then
  Fisher-weighted k-means (`quantize`);
- `uniform`: one width for every kernel, evenly spaced levels, entropy coded by the file
  (Choi et al. 2017's uniform quantization with entropy coding);
- `ecsq-fisher`, `ecsq`: `quantize_to_target(size_bytes=..., prune_zero=True)`, with and
  without the Fisher as weights; a weight may be quantized to 0 (pruned). Targets: the
  sizes of the `kmeans` and `uniform` files (paired comparisons at equal size) and
  {", ".join(f"{f:g}" for f in cfg["smaller"])} of the smallest of them.
- `fisher-step`, `step`: `quantize_to_target(size_bytes=..., method="fisher_step",
  prune_zero=True)` at the same targets, with and without the Fisher: each kernel's weights
  rounded to a grid through 0 whose step is `sqrt(6 lam / (ln 2 * F̄))`, `F̄` the mean
  Fisher of its kept weights (1 without the Fisher), one `lam` for all kernels; the
  weights rounded to 0 are pruned. Adam's `nu` as the posterior precision: the step is a
  fixed fraction of the posterior std `1 / sqrt(N F̄)`, and the high-rate optimum of
  distortion plus `lam` times the bits of an entropy-coded uniform quantizer.
{_rate_bullet(record)}

Command: `{record["command"]}` — wall time {meta["wall_minutes"]:.1f} min ({meta["started_utc"]},
{machine_words(meta)}; jax {meta["jax"]} on {meta["backend"]}),
{len(runs)} seed(s), training included unless read from the cache. Written by
`experiments/rate_distortion.py`.

Setup: dense Adam lr {cfg["lr"]}, {cfg["dense_steps"]} steps of batch {cfg["batch_size"]};
then `pruned(adam(lr={cfg["prune_lr"]}))` through the levels
{", ".join(f"{v:g}" for v in cfg["levels"])} of the prunable kernels ({cfg["ramp"]} steps of
ramp and {cfg["hold"]} of hold each, mask every {cfg["update_every"]} steps). Dense accuracy
{dense[0]:.2f} ± {dense[1]:.2f}%, pruned {pruned[0]:.2f} ± {pruned[1]:.2f}%. Ratios are against
4 bytes per parameter (biases included, stored raw in every file).

**Accuracy of the model read back from the file** (mean ± std over seeds; Δ dense against
the dense mean):

{markdown(frontier_rows(record))}

**Reading** (paired at equal file size):

{reading(record)}

{rate_section(record)}

**File split** (bytes; seed 0, each method's smallest file; entries: codebook entries per
kernel):

{markdown(split_rows(record))}

**Code bits per kept weight per layer** (seed 0; `kmeans` at its settings, `ecsq-fisher`
and `fisher-step` at the same file size). ECSQ prices a bit the same in every layer (one
`lam`), the rate-distortion allocation, and so do the Fisher steps by their high-rate
formula; `allocate_bits` chooses one width per layer from its summed saliency. Mean Fisher
per kept weight (seed 0, Adam's `nu`): {fisher_line(record)}.

{markdown(layer_rows(record))}
"""


def _rate_bullet(record: dict) -> str:
    if not _rate_points(record["runs"][0]):
        return (
            "- `ecsq-fisher-rate`, `ecsq-fisher-ft` (`ecsq-fisher` after a short fine-tuning "
            "of the weights with and without the rate penalty): not in this run "
            "(`--no-rate-tuning`)."
        )
    return (
        "- `ecsq-fisher-rate`, `ecsq-fisher-ft`: `ecsq-fisher` after a short fine-tuning of "
        "the\n  weights with and without the rate penalty, at the same targets (below)."
    )


def rate_section(record: dict) -> str:
    """The page's section on rate-aware fine-tuning (empty without its points)."""
    cfg = record["config"]
    if not _rate_points(record["runs"][0]):
        return ""
    return f"""**Rate-aware fine-tuning** (`ecsq-fisher-rate`). From the pruned model, `q0 =
quantize_to_target(params, size_bytes=S, fisher=F, mask=M, prune_zero=True)`; then
{cfg["rate_steps"]} steps of `adam({cfg["rate_lr"]})` (batch {cfg["batch_size"]}) on the
cross-entropy plus `mu * rate_penalty(params, q0, fisher=F)`, with every weight that `q0`
does not code held at 0 (`keep_pruned`), on the training set less its last
{cfg["held_out"]:,} examples; then `quantize_to_target` again at the same `S`. The control,
`ecsq-fisher-ft`, is the same with `mu = 0` (same steps, same batches, same mask): the
penalty's share of any gain is the difference between the two. `mu` is tried at
{", ".join(f"{m:g}" for m in cfg["rate_mu"])} and chosen per seed and target by the accuracy
on the {cfg["held_out"]:,} held-out training examples (which the first training saw, the
fine-tuning did not), never on the test set. Test accuracy (mean ± std over seeds):

{markdown(rate_rows(record))}

{rate_reading(record)}"""


def load(cfg: Config) -> datasets.Dataset:
    if cfg.dataset == "digits":
        return datasets.load_digits_dataset()
    return datasets.load_fashion_mnist()


def config(args: argparse.Namespace) -> Config:
    """The run's configuration from the command line."""
    cfg = SMOKE if args.smoke else dataclasses.replace(Config(), seeds=args.seeds)
    return dataclasses.replace(cfg, rate_at=0) if args.no_rate_tuning else cfg


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = config(args)
    data = load(cfg)
    out = Path(args.out)
    cache = Cache(args.cache_dir or str(out / "cache"))
    start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs = [run_seed(cfg, data, seed, cache) for seed in range(cfg.seeds)]
    record = {
        "dataset": data.name,
        "input_size": int(np.prod(data.x_train.shape[1:])),
        "command": " ".join(["python -m experiments.rate_distortion", *argv]),
        "config": dataclasses.asdict(cfg),
        "meta": run_meta(start, started),
        "runs": runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rate-distortion-{data.name}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"Wrote {path}.")
    print(markdown(frontier_rows(record)))
    print(reading(record))
    if _rate_points(record["runs"][0]):
        print(markdown(rate_rows(record)))
        print(rate_reading(record))
    if args.write_docs:
        doc = Path(args.docs_page or REPO / "docs" / "results" / "rate-distortion.md")
        doc.write_text(page(record))
        print(f"Wrote {doc}.")
    return record


if __name__ == "__main__":
    main()
