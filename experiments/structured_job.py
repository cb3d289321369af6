"""The structured job: remove whole channels, heads and units; measure the wall-clock speedup.

For each model (``experiments/structured_models.py``: a CIFAR-style ResNet and a small ViT,
both NNX) and seed, on Fashion-MNIST:

1. **Dense.** Train with ``optax.adam`` (cosine decay) on a subset of the training images.
2. **Trace** the model once (:func:`fisher_optax.depgraph.dependency_graph`): the groups of
   coupled units (a residual stage's channels, a block's inner channels, attention heads, MLP
   units; the ViT's residual stream too with ``exact=False``, an inexact cut).
3. **Remove units while training**, continuing the dense run's Adam state, through a
   staircase of levels (a ramp of ``ramp`` steps, ``hold`` steps, a checkpoint). Every
   ``update_every`` steps the per-weight scores of the criterion are summed over each unit
   and :func:`fisher_optax.depgraph.select_groups` removes the lowest units of every group
   (the same fraction of each group, so at a level every criterion gives the same
   architecture, and the comparison is at equal speed); gradients, weights and Adam's
   moments of removed units are held at zero. This is ``pruned(pattern=Groups(graph))``'s
   loop, written out because the first-order Taylor criterion reads Adam's ``mu``, which a
   ``pruned`` criterion does not receive. The criteria, each a sum over every weight a unit
   removes (its filter, its BatchNorm entries, the consumers' input slices):

   - ``saliency``: OBD's :math:`\\tfrac12 F w^2`, :math:`F` from Adam's ``nu``;
   - ``fisher``: :math:`F`;
   - ``l1``: :math:`|w|` (Li et al. 2017; Torch-Pruning's ``MagnitudeImportance``);
   - ``taylor``: :math:`|\\bar g w|` with :math:`\\bar g` Adam's bias-corrected ``mu``, an
     average of recent gradients (Molchanov et al. 2019; Torch-Pruning's
     ``TaylorImportance`` accumulates gradients over batches the same way);
   - ``random``: i.i.d. uniform scores.

4. At each checkpoint **cut** (:func:`~fisher_optax.depgraph.cut`, checked against the masked
   model), slice Adam's state (:func:`~fisher_optax.depgraph.cut_optimizer`) and
   **fine-tune** the smaller model with it for ``ft_steps`` steps.
5. **Measure** accuracy, parameters, FLOPs (XLA's cost analysis) and the median inference
   time of every level's cut model against the dense model, interleaved in one loop, warm
   and jitted, at batch 1 and batch 256.

Every phase is cached under ``--cache-dir`` keyed by what it depends on and
:func:`experiments.versions.code_version`, so a rerun after a crash resumes. The report
(JSON, PNG, and with ``--write-docs`` the section of ``docs/results/structured.md``) is
generated from the JSON alone (``--render-only`` redraws it).

Run from the repository root:
      python -m experiments.structured_job --write-docs   # the full run (`make speed-job`)
      python -m experiments.structured_job --quick        # tiny, for CI
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import fisher_optax
from experiments import datasets, structured_models
from experiments.main_job import Cache, _key, lr_schedule, staircase
from experiments.report import cpu_cores, machine_words, markdown, mean_std, write_section
from fisher_optax import depgraph
from fisher_optax.flax import param_count_and_flops

REPO = Path(__file__).resolve().parents[1]
CRITERIA = ("saliency", "fisher", "l1", "taylor", "random")


@dataclasses.dataclass(frozen=True)
class Config:
    model: str
    seed: int
    arch: tuple[tuple[str, Any], ...]  # keyword arguments of the model's builder
    exact: bool  # dependency_graph's exact (False: the ViT's residual stream is cut too)
    n_train: int  # training images used (the first n of a fixed shuffle)
    dense_steps: int
    batch_size: int
    lr: float
    levels: tuple[float, ...]  # fraction of every group's units removed at each checkpoint
    ramp: int
    hold: int
    update_every: int
    prune_lr: float
    ft_steps: int
    ft_lr: float
    time_rounds: int  # interleaved timing rounds (medians over them)
    eval_batch: int = 1000


ARCH = {
    # ResNet-8 in He et al.'s CIFAR layout (one basic block per stage), stem stride 2: the
    # stages run at 14x14, 7x7 and 4x4, a quarter of the FLOPs of the stride-1 stem.
    "resnet": (("width", 16), ("blocks", 1), ("stem_stride", 2)),
    # 16 patches of 7x7 pixels, a 64-wide stream, 2 blocks of 4 heads of 16 and MLPs of 128.
    "vit": (("dim", 64), ("depth", 2), ("heads", 4), ("mlp", 128), ("patch", 7)),
}
COMMON = dict(
    n_train=30000,
    batch_size=128,
    # Every kept width a multiple of 4 (ResNet 12/24/48, 8/16/32, 4/8/16; ViT MLP 96, 64, 32):
    # the time of XLA's CPU kernels depends on the width, not only on the FLOPs (the results
    # page shows it), so the levels avoid odd widths.
    levels=(0.25, 0.5, 0.75),
    ramp=40,
    hold=40,
    update_every=10,
    ft_steps=300,
    time_rounds=21,
)
PRESETS = {
    "resnet": dict(COMMON, arch=ARCH["resnet"], exact=True, dense_steps=1500, lr=3e-3,
                   prune_lr=1e-3, ft_lr=1e-3),
    "vit": dict(COMMON, arch=ARCH["vit"], exact=True, dense_steps=2500, lr=2e-3,
                prune_lr=7e-4, ft_lr=7e-4),
    "vit-stream": dict(COMMON, arch=ARCH["vit"], exact=False, dense_steps=2500, lr=2e-3,
                       prune_lr=7e-4, ft_lr=7e-4),
}  # fmt: skip
QUICK = dict(
    n_train=512,
    dense_steps=20,
    batch_size=32,
    levels=(0.5, 0.75),
    ramp=4,
    hold=4,
    update_every=2,
    ft_steps=4,
    time_rounds=3,
    eval_batch=500,
)
QUICK_ARCH = {
    "resnet": (("width", 4), ("blocks", 1), ("stem_stride", 2)),
    "vit": (("dim", 8), ("depth", 1), ("heads", 2), ("mlp", 8), ("patch", 7)),
}


def build(cfg: Config, seed: int | None = None) -> nnx.Module:
    arch = dict(cfg.arch)
    seed = cfg.seed if seed is None else seed
    if cfg.model == "resnet":
        return structured_models.make_resnet(arch.pop("width"), seed, **arch)
    return structured_models.make_vit(arch.pop("dim"), seed, **arch)


# ---------------------------------------------------------------------------------------------
# Functional training: the model as (graphdef, params, rest); each function compiles once per
# graphdef (the cut models of one level share theirs across criteria and seeds).


def split(model: nnx.Module) -> tuple[Any, Any, Any, Any]:
    """``(train graphdef, eval graphdef, params, rest)``; the model is left in eval mode."""
    model.train()
    gd_train, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    gd_eval = nnx.graphdef(model)
    return gd_train, gd_eval, params, rest


def _where(mask: Any, tree: Any) -> Any:
    return jax.tree.map(lambda m, x: jnp.where(m, x, 0), mask, tree)


@functools.partial(jax.jit, static_argnames=("gd", "tx"), donate_argnums=(0, 1, 2))
def train_step(params, rest, opt_state, mask, x, y, *, gd, tx):
    """One Adam step in training mode; with a ``mask`` removed entries stay exactly zero."""

    def loss(p, r):
        model = nnx.merge(gd, p, r, copy=True)
        logits = model(x)
        value = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return value, nnx.state(model, nnx.Not(nnx.Param))

    (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(params, rest)
    if mask is not None:
        grads = _where(mask, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if mask is not None:
        params = _where(mask, params)
    return params, rest, opt_state, value


@functools.partial(jax.jit, static_argnames=("gd",))
def _logits(params, rest, x, *, gd):
    return nnx.merge(gd, params, rest, copy=True)(x)


def evaluate(gd_eval, params, rest, data, batch: int) -> float:
    """Test accuracy in percent (evaluation mode: BatchNorm's running statistics)."""
    hits = 0
    for i in range(0, len(data.y_test), batch):
        x = jnp.asarray(data.x_test[i : i + batch])
        hits += int((np.asarray(_logits(params, rest, x, gd=gd_eval)).argmax(-1) ==
                     data.y_test[i : i + batch]).sum())  # fmt: skip
    return 100.0 * hits / len(data.y_test)


def train(params, rest, opt_state, mask, data, steps, cfg, rng, *, gd, tx):
    """``steps`` (a count or an iterable such as a progress bar) steps on random batches."""
    loss = jnp.nan
    for _ in range(steps) if isinstance(steps, int) else steps:
        idx = rng.integers(0, cfg.n_train, cfg.batch_size)
        params, rest, opt_state, loss = train_step(
            params, rest, opt_state, mask, data.x_train[idx], data.y_train[idx], gd=gd, tx=tx
        )
    return params, rest, opt_state, float(loss)


@functools.cache
def _txs(lr, dense_steps, ramp, hold, prune_lr, ft_lr, ft_steps):
    """Adam with the main job's schedule (cosine over the dense steps, then over each
    level), and Adam with a cosine decay over the fine-tuning; cached so that every seed
    shares one compiled step."""
    fields = dict(lr=lr, dense_steps=dense_steps, ramp=ramp, hold=hold, prune_lr=prune_lr)
    main = optax.adam(lr_schedule(argparse.Namespace(**fields)))
    fine = optax.adam(optax.cosine_decay_schedule(ft_lr, ft_steps, alpha=0.1))
    return main, fine


def txs(cfg: Config):
    return _txs(cfg.lr, cfg.dense_steps, cfg.ramp, cfg.hold, cfg.prune_lr, cfg.ft_lr, cfg.ft_steps)


# ---------------------------------------------------------------------------------------------
# Criteria: per-weight scores, summed over each unit by select_groups.


@functools.partial(jax.jit, static_argnames=("criterion", "batch_size"))
def weight_scores(params, opt_state, key, *, criterion, batch_size):
    adam = opt_state[0]
    if criterion == "l1":
        return jax.tree.map(jnp.abs, params)
    if criterion == "random":
        return fisher_optax.scores(params, "random", key=key)
    if criterion == "taylor":
        correction = 1 - 0.9 ** adam.count.astype(jnp.float32)  # optax's default b1
        return jax.tree.map(lambda m, w: jnp.abs(m / correction * w), adam.mu, params)
    fisher = fisher_optax.fisher_from_state(opt_state, batch_size=batch_size)
    return fisher_optax.scores(params, criterion, fisher=fisher)


_RESELECT: dict[int, tuple[depgraph.DepGraph, Any]] = {}


def reselect(graph, *args):
    """The grown mask and the parameters and Adam moments zeroed by it (jitted per graph,
    which is not hashable: kept by its id with the graph itself, so the id stays valid)."""
    if id(graph) not in _RESELECT:
        _RESELECT[id(graph)] = (graph, jax.jit(functools.partial(_reselect, graph=graph)))
    return _RESELECT[id(graph)][1](*args)


def _reselect(scores, sparsity, mask, params, opt_state, *, graph):
    mask = depgraph.select_groups(graph, scores, sparsity, scope="group", mask=mask)
    adam = opt_state[0]
    adam = adam._replace(mu=_where(mask, adam.mu), nu=_where(mask, adam.nu))
    return mask, _where(mask, params), (adam, *opt_state[1:])


def kept_units(graph, mask) -> tuple[np.ndarray, ...]:
    """The ``keep`` of :func:`depgraph.cut` from a mask: a unit stays if any entry does."""
    counts = depgraph.group_scores(
        graph, jax.tree.map(lambda m: m.astype(jnp.float32), mask), lambda p, f: p
    )
    return tuple(c > 0 for c in counts)


# ---------------------------------------------------------------------------------------------
# Phases


DENSE_FIELDS = ("model", "seed", "arch", "n_train", "dense_steps", "batch_size", "lr")
PRUNE_FIELDS = (*DENSE_FIELDS, "exact", "levels", "ramp", "hold", "update_every", "prune_lr",
                "ft_steps", "ft_lr", "eval_batch")  # fmt: skip
TIME_FIELDS = ("model", "seed", "arch", "exact", "levels", "time_rounds")


def _fields(cfg: Config, names: tuple[str, ...]) -> dict:
    return {n: getattr(cfg, n) for n in names}


def _numbered(tree: Any) -> dict[str, np.ndarray]:
    return {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def _restore(like: Any, flat: dict) -> Any:
    leaves = [flat[str(i)] for i in range(len(jax.tree.leaves(like)))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def dense_phase(cfg: Config, data, cache: Cache):
    """The trained dense model: ``(model, opt_state, info)``."""
    model = build(cfg)
    gd_train, gd_eval, params, rest = split(model)
    main_tx, _ = txs(cfg)
    opt_state = main_tx.init(params)
    ck = _key("structured-dense", _fields(cfg, DENSE_FIELDS))
    hit = cache.get("sdense", ck)
    if hit is not None:
        trees, info = hit
        params, rest = _restore(params, trees["params"]), _restore(rest, trees["rest"])
        opt_state = _restore(opt_state, trees["opt"])
        return nnx.merge(gd_eval, params, rest), opt_state, info
    rng = np.random.default_rng([cfg.seed, 0])
    t0 = time.perf_counter()
    params, rest, opt_state, loss = train(
        params, rest, opt_state, None, data,
        tqdm(range(cfg.dense_steps), desc=f"{cfg.model} seed {cfg.seed}: dense", leave=False),
        cfg, rng, gd=gd_train, tx=main_tx,
    )  # fmt: skip
    info = {
        "accuracy": evaluate(gd_eval, params, rest, data, cfg.eval_batch),
        "loss": loss,
        "seconds": time.perf_counter() - t0,
    }
    trees = {"params": _numbered(params), "rest": _numbered(rest), "opt": _numbered(opt_state)}
    cache.put("sdense", ck, trees, info)
    return nnx.merge(gd_eval, params, rest), opt_state, info


def prune_phase(criterion: str, cfg: Config, data, cache: Cache, dense, graph) -> list[dict]:
    """The staircase of ``criterion``; per level the pruned, cut and fine-tuned accuracy."""
    model, dense_opt, dense_info = dense
    ck = _key("structured-prune", _fields(cfg, PRUNE_FIELDS), criterion, dense_info["accuracy"])
    hit = cache.get(f"sprune-{criterion}", ck)
    if hit is not None:
        return hit[1]["levels"]
    gd_train, gd_eval, params, rest = split(nnx.clone(model))
    # Copies: the steps donate their inputs, and a clone shares the dense model's arrays.
    params, rest, opt_state = jax.tree.map(jnp.array, (params, rest, dense_opt))
    main_tx, fine_tx = txs(cfg)
    mask = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    schedule = staircase(cfg.levels, cfg.ramp, cfg.hold)
    rng = np.random.default_rng([cfg.seed, 1 + CRITERIA.index(criterion)])
    key = jax.random.key(cfg.seed)
    x_example = jnp.asarray(data.x_test[:8])
    out, t, t0 = [], 0, time.perf_counter()
    chunks = (cfg.ramp + cfg.hold) // cfg.update_every
    bar = tqdm(total=len(cfg.levels) * chunks, desc=f"{cfg.model} seed {cfg.seed}: {criterion}",
               leave=False)  # fmt: skip
    for level in cfg.levels:
        for _ in range(chunks):
            scores = weight_scores(
                params, opt_state, jax.random.fold_in(key, t),
                criterion=criterion, batch_size=cfg.batch_size,
            )  # fmt: skip
            mask, params, opt_state = reselect(graph, scores, schedule(t), mask, params, opt_state)
            params, rest, opt_state, loss = train(
                params, rest, opt_state, mask, data, cfg.update_every, cfg, rng,
                gd=gd_train, tx=main_tx,
            )  # fmt: skip
            t += cfg.update_every
            bar.update()
        pruned_acc = evaluate(gd_eval, params, rest, data, cfg.eval_batch)
        keep = kept_units(graph, mask)
        masked_model = nnx.merge(gd_eval, params, rest, copy=True)
        small = depgraph.cut(masked_model, graph, keep)
        small_opt = depgraph.cut_optimizer(opt_state, graph, keep)
        # Fine-tuning: Adam's sliced moments and count go on; its own schedule from 0.
        small_opt = (small_opt[0], optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)))
        s_train, s_eval, s_params, s_rest = split(small)
        # Copies: a cut leaves an array it does not slice as it was, shared with the pruning
        # run's params and Adam state, and the fine-tuning steps donate their inputs.
        s_params, s_rest, small_opt = jax.tree.map(jnp.array, (s_params, s_rest, small_opt))
        # An exact cut computes what the masked model computes (cut checks it): its accuracy
        # is the masked one's, not evaluated again. An inexact cut's is measured.
        cut_acc = (
            pruned_acc if graph.exact else evaluate(s_eval, s_params, s_rest, data, cfg.eval_batch)
        )
        n_params, flops = param_count_and_flops(small, x_example[:1])
        s_params, s_rest, _, ft_loss = train(
            s_params, s_rest, small_opt, None, data, cfg.ft_steps, cfg, rng,
            gd=s_train, tx=fine_tx,
        )  # fmt: skip
        out.append(
            {
                "level": level,
                "units_kept": [int(k.sum()) for k in keep],
                "pruned_accuracy": pruned_acc,
                "cut_accuracy": cut_acc,
                "accuracy": evaluate(s_eval, s_params, s_rest, data, cfg.eval_batch),
                "loss": loss,
                "ft_loss": ft_loss,
                "n_params": n_params,
                "flops": flops,
            }
        )
    bar.close()
    seconds = time.perf_counter() - t0
    for lvl in out:
        lvl["seconds"] = seconds / len(out)
    cache.put(f"sprune-{criterion}", ck, {}, {"levels": out})
    return out


def _forward(model: nnx.Module):
    model.eval()
    gd, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(gd, s)(x)), state


def median_times(models: list[nnx.Module], x: jax.Array, rounds: int, calls: int) -> list[float]:
    """Median seconds per jitted forward of each model on ``x``, warm; each round times
    ``calls`` calls of every model in turn, so that load drifts hit all models alike."""
    fns = [_forward(m) for m in models]
    for fn, state in fns:  # compile and warm
        for _ in range(2):
            fn(state, x).block_until_ready()
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, (fn, state) in enumerate(fns):
            t = time.perf_counter()
            for _ in range(calls):
                out = fn(state, x)
            out.block_until_ready()
            times[i].append((time.perf_counter() - t) / calls)
    return [float(np.median(t)) for t in times]


def timing_phase(cfg: Config, data, cache: Cache, dense, graph) -> dict:
    """Dense against every level's architecture, interleaved, at batch 1 and 256.

    At a level every criterion keeps the same number of units in every group, so the cut
    models share one architecture (the weights do not change the time): the cut of the
    dense model at each level is timed once, the dense model in the same loop.
    """
    ck = _key("structured-time", _fields(cfg, TIME_FIELDS), dense[2]["accuracy"])
    hit = cache.get("stime", ck)
    if hit is not None:
        return hit[1]
    model = dense[0]
    params = nnx.state(model, nnx.Param)
    n_dense, f_dense = param_count_and_flops(model, jnp.asarray(data.x_test[:1]))
    smalls, kept = [], []
    for level in cfg.levels:
        scores = depgraph.group_scores(graph, params, "magnitude")
        keep = depgraph.group_mask(graph, scores, level, scope="group")
        smalls.append(depgraph.cut(model, graph, keep))
        kept.append([int(k.sum()) for k in keep])
    info = {"n_params": n_dense, "flops": f_dense, "units_kept": kept, "batch": {}}
    t0 = time.perf_counter()
    for batch, calls in ((1, 20), (256, 1)):
        x = jnp.asarray(data.x_test[:batch])
        times = median_times([model, *smalls], x, cfg.time_rounds, calls)
        info["batch"][str(batch)] = {"dense": times[0], "cut": times[1:]}
    info["seconds"] = time.perf_counter() - t0
    cache.put("stime", ck, {}, info)
    return info


def run_seed(
    cfg: Config, data, cache: Cache, graph: depgraph.DepGraph, criteria: tuple[str, ...]
) -> dict:
    t0 = time.perf_counter()
    dense = dense_phase(cfg, data, cache)
    timing = timing_phase(cfg, data, cache, dense, graph)
    levels = {c: prune_phase(c, cfg, data, cache, dense, graph) for c in criteria}
    seconds = dense[2]["seconds"] + timing["seconds"]
    seconds += sum(lv["seconds"] for lvs in levels.values() for lv in lvs)
    return {
        "seed": cfg.seed,
        "dense": dense[2],
        "timing": timing,
        "criteria": levels,
        "groups": [{"name": g.name, "size": g.size} for g in graph.groups],
        "exact": graph.exact,
        "seconds": seconds,
        "wall_seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------
# Report: every figure from the record (the JSON).

MARGIN = 1.0  # points of accuracy below the seed's dense model still counted as "near dense"


def _pm(values, fmt="{:.2f}") -> str:
    m, s = mean_std(values)
    return f"{fmt.format(m)} ± {fmt.format(s)}" if len(values) > 1 else fmt.format(m)


def summarize(model_rec: dict, criteria: list[str]) -> dict:
    """Per level and criterion the accuracies and speedups over seeds; the reading's numbers."""
    cfg, runs = model_rec["config"], model_rec["seeds"]
    n = len(cfg["levels"])
    dense = [r["dense"]["accuracy"] for r in runs]
    speed = {
        b: [[r["timing"]["batch"][b]["dense"] / r["timing"]["batch"][b]["cut"][i] for r in runs]
            for i in range(n)]
        for b in ("1", "256")
    }  # fmt: skip
    s: dict[str, Any] = {"dense": dense, "speed": speed, "criteria": {}}
    for c in criteria:
        acc = [[r["criteria"][c][i]["accuracy"] for r in runs] for i in range(n)]
        best = []
        for k in range(len(runs)):
            near = [speed["256"][i][k] for i in range(n) if acc[i][k] >= dense[k] - MARGIN]
            best.append(max([1.0, *near]))  # the dense model itself is within the margin
        s["criteria"][c] = {
            "accuracy": acc,
            "pruned": [[r["criteria"][c][i]["pruned_accuracy"] for r in runs] for i in range(n)],
            "cut": [[r["criteria"][c][i]["cut_accuracy"] for r in runs] for i in range(n)],
            "best": best,
        }
    # Fisher saliency against L1 at equal speed (the same level): paired over seeds.
    if not {"saliency", "l1"} <= set(criteria):
        return s
    diffs = [
        [a - b for a, b in zip(s["criteria"]["saliency"]["accuracy"][i],
                               s["criteria"]["l1"]["accuracy"][i], strict=True)]
        for i in range(n)
    ]  # fmt: skip
    s["saliency_minus_l1"] = diffs
    return s


def _beyond_noise(d: list[float]) -> bool:
    """The paired difference over seeds is beyond seed noise: a two-sided paired t-test at 5%
    (|mean| above the t quantile times its standard error; 4.30 of them with 3 seeds)."""
    if len(d) < 2:
        return False
    from scipy.stats import t  # scikit-learn's dependency, installed with the experiments

    m, sd = mean_std(d)
    return abs(m) > t.ppf(0.975, len(d) - 1) * sd / np.sqrt(len(d))


def reading(name: str, model_rec: dict, s: dict) -> list[str]:
    criteria = list(s["criteria"])
    cfg = model_rec["config"]
    target = 3.0 if name == "resnet" else 2.0
    speed = [mean_std(v)[0] for v in s["speed"]["256"]]
    fastest = int(np.argmax(speed))
    dense = mean_std(s["dense"])[0]
    best_acc = {c: mean_std(s["criteria"][c]["accuracy"][fastest])[0] for c in criteria}
    top = max(best_acc, key=best_acc.get)
    out = [
        f"Dense {_pm(s['dense'])}%. The fastest cut is the one at {cfg['levels'][fastest]:.0%} "
        f"of units removed: {speed[fastest]:.2f}x at batch 256, "
        f"{mean_std(s['speed']['1'][fastest])[0]:.2f}x at batch 1; there the best criterion "
        f"({top}) is {dense - best_acc[top]:.2f} points below dense after fine-tuning."
    ]
    slower = [f"{lv:.0%}" for lv, v in zip(cfg["levels"], speed, strict=True) if v < 1]
    if slower:
        out.append(
            f"The cut at {', '.join(slower)} of units removed runs slower than the dense model "
            "at batch 256: fewer FLOPs do not make a faster program on XLA's CPU kernels at "
            "every width."
        )
    for i, level in enumerate(cfg["levels"]):
        ranked = sorted(criteria, key=lambda c: -mean_std(s["criteria"][c]["accuracy"][i])[0])
        out.append(
            f"At {level:.0%} removed (the same architecture for every criterion), by accuracy: "
            + ", ".join(f"{c} {_pm(s['criteria'][c]['accuracy'][i])}" for c in ranked)
            + "."
        )
    for c in criteria:
        best = s["criteria"][c]["best"]
        m, _ = mean_std(best)
        out.append(
            f"{c}: largest batch-256 speedup within {MARGIN:.1f} point of dense "
            f"{_pm(best)}x (per seed {', '.join(f'{b:.2f}' for b in best)}); "
            f"{'meets' if m >= target else 'misses'} the {target:.0f}x target."
        )
    for i, level in enumerate(cfg["levels"] if "saliency_minus_l1" in s else ()):
        d = s["saliency_minus_l1"][i]
        m, _ = mean_std(d)
        verdict = (
            ("ahead of" if m > 0 else "behind") + " L1 beyond seed noise"
            if _beyond_noise(d)
            else "not distinguishable from L1 at this seed count"
        )
        out.append(
            f"{level:.0%} of units removed ({mean_std(s['speed']['256'][i])[0]:.2f}x at batch "
            f"256): saliency minus L1 {_pm(d)} points, {verdict} (paired t-test over the "
            "seeds, 5% two-sided)."
        )
    return out


def level_table(model_rec: dict, s: dict) -> list[list[str]]:
    cfg, runs, criteria = model_rec["config"], model_rec["seeds"], list(s["criteria"])
    head = ["removed", "params", "MFLOPs/image", "speedup b256", "speedup b1", *criteria]
    first = runs[0]
    rows = [head, ["0 (dense)", f"{first['timing']['n_params']:,}",
                   f"{first['timing']['flops'] / 1e6:.2f}", "1", "1",
                   *[_pm(s["dense"])] * len(criteria)]]  # fmt: skip
    for i, level in enumerate(cfg["levels"]):
        lv = first["criteria"][criteria[0]][i]
        rows.append(
            [f"{level:.0%}", f"{lv['n_params']:,}", f"{lv['flops'] / 1e6:.2f}",
             _pm(s["speed"]["256"][i]), _pm(s["speed"]["1"][i]),
             *[_pm(s["criteria"][c]["accuracy"][i]) for c in criteria]]
        )  # fmt: skip
    return rows


def before_table(model_rec: dict, s: dict) -> list[list[str]]:
    """Accuracy at the checkpoint before the cut, and of the cut model before fine-tuning."""
    criteria = list(s["criteria"])
    rows = [["removed", *[f"{c} (masked / cut)" for c in criteria]]]
    for i, level in enumerate(model_rec["config"]["levels"]):
        rows.append(
            [f"{level:.0%}", *[f"{mean_std(s['criteria'][c]['pruned'][i])[0]:.2f} / "
                               f"{mean_std(s['criteria'][c]['cut'][i])[0]:.2f}"
                               for c in criteria]]
        )  # fmt: skip
    return rows


def plot(record: dict, summaries: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        s, levels = summaries[name], record["models"][name]["config"]["levels"]
        # Speedup on x: the cut models of all criteria at a level share one architecture.
        x = [1.0, *[mean_std(v)[0] for v in s["speed"]["256"]]]
        dense = mean_std(s["dense"])
        ax.axhline(dense[0] - MARGIN, color="grey", ls=":", lw=1, label=f"dense - {MARGIN:g}")
        for c in s["criteria"]:
            acc = [mean_std(a) for a in s["criteria"][c]["accuracy"]]
            ax.errorbar(x, [dense[0], *[a[0] for a in acc]], yerr=[dense[1], *[a[1] for a in acc]],
                        marker="o", ms=3, capsize=2, lw=1, label=c)  # fmt: skip
        for xi, level in zip(x, [0.0, *levels], strict=True):
            ax.annotate(f"{level:.0%}", (xi, dense[0]), textcoords="offset points",
                        xytext=(0, 4), ha="center", fontsize=7)  # fmt: skip
        ax.set_xlabel("speedup at batch 256 (dense / cut median time, CPU)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name} (% of units removed at the top)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _describe(name: str, cfg: dict) -> str:
    arch = dict(cfg["arch"])
    if cfg["model"] == "resnet":
        text = (
            f"ResNet, {3 * arch['blocks']} basic blocks in 3 stages of widths {arch['width']}/"
            f"{2 * arch['width']}/{4 * arch['width']}, BatchNorm, stem stride "
            f"{arch['stem_stride']}"
        )
    else:
        text = (
            f"ViT, {arch['depth']} blocks, stream {arch['dim']}, {arch['heads']} heads, MLP "
            f"{arch['mlp']}, {arch['patch']}x{arch['patch']} patches"
        )
    cut = "exact cut" if cfg["exact"] else "residual stream cut too (exact=False): inexact cut"
    return f"{text}; {cut}"


def render(record: dict, out: Path, *, plots: bool = True) -> dict:
    summaries = {name: summarize(rec, record["criteria"]) for name, rec in record["models"].items()}
    sections, text = {}, []
    for name, rec in record["models"].items():
        s = summaries[name]
        sections[name] = {
            "level_table": markdown(level_table(rec, s)),
            "before_table": markdown(before_table(rec, s)),
            "lines": reading(name, rec, s),
            "groups": rec["seeds"][0]["groups"],
        }
        text += [f"== {name} ({_describe(name, rec['config'])})",
                 sections[name]["level_table"], *sections[name]["lines"], ""]  # fmt: skip
    png = None
    if plots:
        out.mkdir(parents=True, exist_ok=True)
        png = out / ("structured-quick.png" if record["quick"] else "structured.png")
        plot(record, summaries, png)
    return {"text": "\n".join(text), "sections": sections, "png": png}


def write_docs(page: Path, record: dict, summary: dict) -> None:
    minutes = record["wall_seconds"] / 60
    # The phases' compute time; a dense phase shared by two entries (vit, vit-stream) once.
    total, seen = 0.0, set()
    for m in record["models"].values():
        for r in m["seeds"]:
            dense = (m["config"]["model"], json.dumps(m["config"]["arch"]), r["seed"])
            total += r["seconds"] - (r["dense"]["seconds"] if dense in seen else 0.0)
            seen.add(dense)
    n_seeds = len(next(iter(record["models"].values()))["seeds"])
    out = [
        f"Generated by `make speed-job` (`python -m experiments.structured_job --write-docs`) "
        f"on {record['date_utc']}, {record['platform']}, {machine_words(record)}; "
        f"the command ran {minutes:.0f} minutes of wall time; its phases took "
        f"{total / 60:.0f} minutes in all (each phase's time when it "
        "was computed, compilation included, by this command or by another process filling "
        f"the same cache); {n_seeds} seeds, mean ± std over seeds; every number is in "
        "`results/structured.json`, the plot in `results/structured.png`.",
    ]
    for name, sec in summary["sections"].items():
        cfg = record["models"][name]["config"]
        phases = sum(r["seconds"] for r in record["models"][name]["seeds"]) / 60
        out += [
            "",
            f"**{name}** ({_describe(name, cfg)}; its phases took {phases:.0f} minutes over "
            f"the seeds). Dense: {cfg['dense_steps']} Adam steps of "
            f"{cfg['batch_size']} on the first {cfg['n_train']:,} of the shuffled training "
            f"images; then per criterion {cfg['ramp']} ramp + {cfg['hold']} hold steps per "
            f"level (mask updates every {cfg['update_every']} steps), the cut, and "
            f"{cfg['ft_steps']} fine-tuning steps of the cut model with its sliced Adam state. "
            f"Groups: {', '.join(str(g['size']) for g in sec['groups'])} units. Test accuracy "
            "after fine-tuning, in percent; speedup = median time of the dense model / "
            "median time of the cut model, interleaved in one loop (all criteria share the "
            "architecture of a level):",
            "",
            sec["level_table"],
            "",
            "Accuracy before fine-tuning: the masked model at the checkpoint / the cut model "
            "(equal when the cut is exact):",
            "",
            sec["before_table"],
            "",
            *[f"- {line}" for line in sec["lines"]],
        ]
    write_section(page, "structured", "\n".join(out))


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(PRESETS), help=f"comma list of {list(PRESETS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--criteria", default=",".join(CRITERIA), help=f"comma list of {CRITERIA}")
    p.add_argument("--quick", action="store_true", help="a tiny run for CI")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--out", default="results")
    p.add_argument("--cache-dir", default=None, help="default: <out>/cache")
    p.add_argument("--write-docs", action="store_true",
                   help="replace the generated section of --docs-page")  # fmt: skip
    p.add_argument("--docs-page", default=str(REPO / "docs" / "results" / "structured.md"))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--render-only", action="store_true",
                   help="report from <out>/structured.json")  # fmt: skip
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out)
    json_path = out_dir / ("structured-quick.json" if args.quick else "structured.json")
    if args.render_only:
        record = json.loads(json_path.read_text())
    else:
        names = args.models.split(",")
        for n in names:
            if n not in PRESETS:
                raise SystemExit(f"--models: unknown model {n!r}; choose from {sorted(PRESETS)}")
        seeds = [int(s) for s in args.seeds.split(",")]
        criteria = tuple(args.criteria.split(","))
        for c in criteria:
            if c not in CRITERIA:
                raise SystemExit(f"--criteria: unknown criterion {c!r}; choose from {CRITERIA}")
        data = datasets.load_fashion_mnist(args.data_dir)
        # A fixed shuffle, so that the subset of the first n_train images is one of all classes.
        order = np.random.default_rng(0).permutation(len(data.y_train))
        data = data._replace(x_train=data.x_train[order], y_train=data.y_train[order])
        if args.quick:
            data = data._replace(x_test=data.x_test[:500], y_test=data.y_test[:500])
        cache_dir = Path(args.cache_dir or out_dir / "cache")
        cache = Cache(str(cache_dir))
        # XLA's compiled programs too, so that a rerun after a crash does not compile again.
        jax.config.update("jax_compilation_cache_dir", str(cache_dir / "xla"))
        record = {
            "dataset": data.name,
            "quick": args.quick,
            "platform": f"{jax.default_backend()} jax {jax.__version__}",
            "machine": f"{platform.machine()}, {cpu_cores()} CPU cores",
            "date_utc": time.strftime("%Y-%m-%d", time.gmtime()),
            "criteria": list(criteria),
            "models": {},
        }
        t_all = time.perf_counter()
        cfgs, graphs, runs = {}, {}, {}
        for name in names:
            model = "resnet" if name == "resnet" else "vit"
            preset = dict(PRESETS[name], **(dict(QUICK, arch=QUICK_ARCH[model]) if args.quick
                                            else {}))  # fmt: skip
            cfgs[name] = [Config(model=model, seed=s, **preset) for s in seeds]
            # The graph depends on the architecture only: one trace serves every seed.
            traced = build(cfgs[name][0])
            traced.eval()
            graphs[name] = depgraph.dependency_graph(
                traced, jnp.asarray(data.x_test[:8]), exact=cfgs[name][0].exact
            )
            runs[name] = []
        # Seeds outermost: an interrupted run has whole seeds of every model in the cache.
        for k in tqdm(range(len(seeds)), desc="seeds", leave=False):
            for name in names:
                runs[name].append(run_seed(cfgs[name][k], data, cache, graphs[name], criteria))
        for name in names:
            cfg = dataclasses.asdict(cfgs[name][0])
            del cfg["seed"]
            record["models"][name] = {"config": cfg, "seeds": runs[name]}
        record["wall_seconds"] = time.perf_counter() - t_all
        record["load_average"] = os.getloadavg()[2] if hasattr(os, "getloadavg") else None
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(record, indent=1))
    summary = render(record, out_dir, plots=not args.no_plots)
    print(summary["text"])
    if args.write_docs:
        write_docs(Path(args.docs_page), record, summary)
    return record


if __name__ == "__main__":
    main()
