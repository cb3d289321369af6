"""One-shot pruning without retraining: block-Fisher OBS against diagonal OBD and magnitude.

WoodFisher's experiment (Singh & Alistarh 2020, arXiv:2004.14340) on Fashion-MNIST: train an
MLP dense with Adam (``--model``: WoodFisher's 784-40-20-10, ``mlp-40-20``, or LeCun's
LeNet-300-100, ``lenet-300-100``), then prune its kernels once, globally, at each sparsity,
and measure the test accuracy with no retraining, by three methods:

- ``magnitude``: the smallest ``|w|`` go, the rest stay as they are;
- ``obd``: optimal brain damage, ``0.5 F w^2`` with the Fisher diagonal read from Adam's ``nu``
  (``fisher_from_state`` then ``scores(..., "saliency")``), the rest stay as they are;
- ``obs``: optimal brain surgeon with the block empirical Fisher of ``m`` per-example
  gradients (``fisher_optax.obs``): ranked by the single-weight OBS saliency, the removed
  weights of each block taken out at once with the exact update of the others. Its damping
  is chosen per seed and sparsity on a held-out split of the training set, never the test set.

It also times the pieces against the diagonal empirical Fisher of the same examples
(``fisher_optax.empirical_fisher``, by ``vmap(grad)`` and by its per-layer closed forms) and
one training epoch, and counts their floats.

``python -m experiments.oneshot_obs --model M`` writes ``results/oneshot-obs-<dataset>-M.json``;
``--write-docs`` also writes the model's section of ``docs/results/oneshot-obs.md``.
``--smoke`` runs a tiny configuration on sklearn digits in seconds (the CI test).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
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
from experiments.report import machine_words, markdown, mean_std, run_meta, write_section

REPO = Path(__file__).resolve().parents[1]
METHODS = ("magnitude", "obd", "obs", "obs_steps")
MODELS = {"mlp-40-20": models.MLP(hidden=(40, 20)), "lenet-300-100": models.MODELS["lenet-300-100"]}


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str = "fashion-mnist"
    model: str = "mlp-40-20"
    seeds: int = 3
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
    block_size: int = 64
    n_grads: int = 1000
    dampings: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)
    val_size: int = 5000
    steps: int = 8


# LeNet-300-100 has 8x the weights: blocks of 32 and 500 gradients keep its run near the small
# MLP's cost per weight (the inverse costs n B^2, the block Fisher n m B).
PRESETS = {"mlp-40-20": {}, "lenet-300-100": {"block_size": 32, "n_grads": 500}}

SMOKE = Config(
    dataset="digits",
    seeds=1,
    epochs=10,
    batch_size=64,
    sparsities=(0.5, 0.9),
    block_size=16,
    n_grads=32,
    dampings=(1e-3, 1e-2),
    val_size=200,
    steps=2,
)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.oneshot_obs", description=__doc__)
    d = Config()
    p.add_argument("--dataset", choices=("fashion-mnist", "digits"), default=d.dataset)
    p.add_argument("--model", choices=tuple(MODELS), default=d.model)
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--epochs", type=int, default=d.epochs, help="dense Adam epochs")
    p.add_argument("--sparsities", type=_floats, default=d.sparsities, help="e.g. 0.5,0.9")
    p.add_argument("--block-size", type=int, default=None, help="OBS block size B (preset)")
    p.add_argument("--n-grads", type=int, default=None, help="m per-example gradients (preset)")
    p.add_argument("--dampings", type=_floats, default=d.dampings, help="tuned on held-out")
    p.add_argument("--steps", type=int, default=d.steps, help="steps of the multi-step OBS")
    p.add_argument("--smoke", action="store_true", help="tiny run on sklearn digits (seconds)")
    p.add_argument("--out", default="results", help="directory of the JSON")
    p.add_argument("--write-docs", action="store_true", help="write the docs page")
    p.add_argument("--docs-page", default=None, help="default: docs/results/oneshot-obs.md")
    return p


def make_config(args: argparse.Namespace) -> Config:
    if args.smoke:
        return SMOKE
    preset = {**dataclasses.asdict(Config()), **PRESETS[args.model]}
    return Config(
        dataset=args.dataset,
        model=args.model,
        seeds=args.seeds,
        epochs=args.epochs,
        sparsities=tuple(args.sparsities),
        block_size=preset["block_size"] if args.block_size is None else args.block_size,
        n_grads=preset["n_grads"] if args.n_grads is None else args.n_grads,
        dampings=tuple(args.dampings),
        steps=args.steps,
        val_size=200 if args.dataset == "digits" else Config.val_size,
    )


@partial(jax.jit, static_argnames=("model", "steps", "batch_size"))
def train(params, key, x, y, lr, *, model, steps, batch_size):
    """``steps`` Adam steps on random mini-batches; returns the params and Adam's state."""
    opt = optax.adam(lr)

    def step(carry, k):
        params, state = carry
        idx = jax.random.randint(k, (batch_size,), 0, x.shape[0])
        grads = jax.grad(partial(models.loss_fn, model))(params, x[idx], y[idx])
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    keys = jax.random.split(key, steps)
    (params, state), _ = jax.lax.scan(step, (params, opt.init(params)), keys)
    return params, state


@partial(jax.jit, static_argnames=("model",))
def accuracy(params, x, y, *, model):
    return jnp.mean(jnp.argmax(models.apply(model, params, x), -1) == y)


@jax.jit
def baseline_masks(params, fisher, sparsity):
    """Magnitude and OBD keep-masks over the kernels, ranked globally."""
    mag = fo.select(fo.scores(params, "magnitude"), sparsity)
    obd = fo.select(fo.scores(params, "saliency", fisher=fisher), sparsity)
    return mag, obd


obs_prune = jax.jit(fo.obs.obs_prune)


@partial(jax.jit, static_argnames=("model",))
def example_grads(params, x, y, *, model):
    return fo.obs.per_example_grads(lambda p, b: models.loss_fn(model, p, *b), params, (x, y))


@partial(jax.jit, static_argnames=("model", "method"))
def diagonal_fisher(params, x, y, *, model, method):
    loss = lambda p, b: models.loss_fn(model, p, *b)
    return fo.empirical_fisher(loss, params, (x, y), method=method)


def _timed(fn, *args, **kwargs) -> float:
    """Seconds of a compiled call: one call to compile, the second timed."""
    jax.block_until_ready(fn(*args, **kwargs))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    return time.perf_counter() - t


def _n_floats(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def levels(cfg: Config) -> list[float]:
    """The sparsities the multi-step run passes through: ``steps`` points of Zhu and Gupta's
    cubic schedule up to the largest target, and every target."""
    top, k = max(cfg.sparsities), cfg.steps
    cubic = {round(top * (1 - (1 - j / k) ** 3), 4) for j in range(1, k + 1)}
    return sorted(cubic | set(cfg.sparsities))


def run_seed(cfg: Config, data: datasets.Dataset, seed: int) -> dict:
    model = MODELS[cfg.model]
    x_all, y_all = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_tr, y_tr = x_all[: -cfg.val_size], y_all[: -cfg.val_size]
    x_val, y_val = x_all[-cfg.val_size :], y_all[-cfg.val_size :]
    x_te, y_te = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    k_init, k_train, k_grads = jax.random.split(jax.random.key(seed), 3)
    params = model.init(k_init, x_tr.shape[1:])
    steps_per_epoch = x_tr.shape[0] // cfg.batch_size

    t = time.perf_counter()
    params, state = train(
        params, k_train, x_tr, y_tr, cfg.lr, model=model,
        steps=cfg.epochs * steps_per_epoch, batch_size=cfg.batch_size,
    )  # fmt: skip
    jax.block_until_ready(params)
    epoch_s = (time.perf_counter() - t) / cfg.epochs
    fisher = fo.fisher_from_state(state, batch_size=cfg.batch_size)

    idx = jax.random.choice(k_grads, x_tr.shape[0], (cfg.n_grads,), replace=False)
    x_g, y_g = x_tr[idx], y_tr[idx]
    grads = jax.block_until_ready(example_grads(params, x_g, y_g, model=model))
    grads_s = _timed(example_grads, params, x_g, y_g, model=model)
    diag_s = {
        m: _timed(diagonal_fisher, params, x_g, y_g, model=model, method=m)
        for m in ("vmap", "layers")
    }
    finvs = {}
    for d in cfg.dampings:
        t = time.perf_counter()
        finvs[d] = jax.block_until_ready(
            fo.obs.block_fisher_inverse(grads, block_size=cfg.block_size, damping=d)
        )
        inverse_s = time.perf_counter() - t  # the last, compiled, damping's time

    acc = partial(accuracy, model=model)

    # Multi-step: no retraining either, but the gradients and the inverse are recomputed at
    # the pruned and updated weights before each further step (WoodFisher's and oBERT's
    # recipe for high sparsity); one trajectory per damping.
    steps = {d: {} for d in cfg.dampings}
    for d in cfg.dampings:
        p, keep = params, None
        for level in levels(cfg):
            g = example_grads(p, x_g, y_g, model=model)
            finv = fo.obs.block_fisher_inverse(g, block_size=cfg.block_size, damping=d)
            p, keep = obs_prune(p, finv, jnp.float32(level), mask=keep)
            if level in cfg.sparsities:
                steps[d][level] = (float(acc(p, x_val, y_val)), float(acc(p, x_te, y_te)))

    out = {
        "seed": seed,
        "dense": float(acc(params, x_te, y_te)),
        "seconds": {
            "epoch": epoch_s,
            "per_example_grads": grads_s,
            "inverse": inverse_s,
            "fisher_vmap": diag_s["vmap"],
            "fisher_layers": diag_s["layers"],
        },
        "floats": {"params": _n_floats(params), "grads": _n_floats(grads)},
        "rows": [],
    }
    out["floats"]["finv"] = _n_floats(finvs[cfg.dampings[0]])
    for s in cfg.sparsities:
        sp = jnp.float32(s)
        mag, obd = baseline_masks(params, fisher, sp)
        val = {d: float(acc(obs_prune(params, finvs[d], sp)[0], x_val, y_val)) for d in finvs}
        best = max(cfg.dampings, key=lambda d: (val[d], -d))
        best_steps = max(cfg.dampings, key=lambda d: (steps[d][s][0], -d))
        t = time.perf_counter()
        pruned, keep = jax.block_until_ready(obs_prune(params, finvs[best], sp))
        prune_s = time.perf_counter() - t
        row = {
            "sparsity": s,
            "magnitude": float(acc(fo.apply_mask(params, mag), x_te, y_te)),
            "obd": float(acc(fo.apply_mask(params, obd), x_te, y_te)),
            "obs": float(acc(pruned, x_te, y_te)),
            "obs_steps": steps[best_steps][s][1],
            "obs_damping": best,
            "obs_steps_damping": best_steps,
            "obs_val": val,
            "obs_steps_val": {d: steps[d][s][0] for d in cfg.dampings},
            "obs_prune_seconds": prune_s,
            "kept": int(sum(int(k.sum()) for k in jax.tree.leaves(keep))),
        }
        out["rows"].append(row)
        print(
            f"seed {seed} sparsity {s:.2f}: magnitude {row['magnitude']:.3f} obd "
            f"{row['obd']:.3f} obs {row['obs']:.3f} (damping {best:g}) obs in "
            f"{cfg.steps} steps {row['obs_steps']:.3f} (damping {best_steps:g})",
            flush=True,
        )
    return out


def load(cfg: Config) -> datasets.Dataset:
    if cfg.dataset == "digits":
        return datasets.load_digits_dataset()
    return datasets.load_fashion_mnist()


def summarize(record: dict) -> list[list[str]]:
    cfg, runs = record["config"], record["runs"]
    head = ["magnitude", "OBD (Adam nu)", "OBS, 1 step", f"OBS, {cfg['steps']} steps"]
    rows = [["sparsity", *head, "damping per seed (1 step; steps)"]]
    for i, s in enumerate(cfg["sparsities"]):
        stats = {m: mean_std([r["rows"][i][m] * 100 for r in runs]) for m in METHODS}
        text = [f"{v[0]:.1f} ± {v[1]:.1f}" for v in stats.values()]
        top = max(round(v[0], 1) for v in stats.values())
        cells = [
            f"**{t}**" if round(v[0], 1) == top else t
            for t, v in zip(text, stats.values(), strict=True)
        ]
        damp = "; ".join(
            ", ".join(f"{r['rows'][i][key]:g}" for r in runs)
            for key in ("obs_damping", "obs_steps_damping")
        )
        rows.append([f"{s * 100:g}%", *cells, damp])
    return rows


def section(record: dict) -> str:
    """The model's section of the results page: command, setup, table, cost."""
    cfg, runs, meta = record["config"], record["runs"], record["meta"]
    sec = {k: float(np.mean([r["seconds"][k] for r in runs])) for k in runs[0]["seconds"]}
    prune_s = float(np.mean([row["obs_prune_seconds"] for r in runs for row in r["rows"]]))
    fl = runs[0]["floats"]
    dense = mean_std([r["dense"] * 100 for r in runs])
    sizes = "-".join(str(h) for h in (record["input_size"], *MODELS[cfg["model"]].hidden, 10))
    return f"""### MLP {sizes} ({cfg["model"]}) on {record["dataset"]}

Command: `{record["command"]}` — wall time {meta["wall_minutes"]:.1f} min ({meta["started_utc"]},
{machine_words(meta)}; jax {meta["jax"]} on {meta["backend"]}), {len(runs)}
seeds, jit compilation included. Written by `experiments/oneshot_obs.py`.

Setup: Adam lr {cfg["lr"]}, batch {cfg["batch_size"]}, {cfg["epochs"]} epochs on the training set
less its last {cfg["val_size"]} images (the held-out split). OBS: blocks of B =
{cfg["block_size"]} consecutive weights, m = {cfg["n_grads"]} per-example gradients of training
images, damping chosen among {", ".join(f"{d:g}" for d in cfg["dampings"])} by the accuracy on the
held-out split, per seed and sparsity. "OBS, {cfg["steps"]} steps" passes through {cfg["steps"]}
steps of a cubic schedule (and the targets).

**Test accuracy (%) after one-shot pruning, no retraining** (mean ± std over seeds; best in
bold). Dense: {dense[0]:.1f} ± {dense[1]:.1f}.

{markdown(summarize(record))}

**Cost** (mean over seeds, this machine, compiled calls): one training epoch
{sec["epoch"]:.2f} s. For the m = {cfg["n_grads"]} examples: the diagonal empirical Fisher
(`empirical_fisher`) {sec["fisher_vmap"]:.2f} s by `vmap(grad)` and {sec["fisher_layers"]:.2f} s
by its per-layer closed forms; the per-example gradients (`per_example_grads`, `vmap(grad)`)
{sec["per_example_grads"]:.2f} s, then the block Fisher inverse (`block_fisher_inverse`)
{sec["inverse"]:.2f} s and one `obs_prune` {prune_s:.3f} s. Memory in float32: the diagonal
Fisher {fl["params"]:,} floats ({fl["params"] * 4 / 2**20:.2f} MiB, the parameters once); the
gradients {fl["grads"]:,} ({fl["grads"] * 4 / 2**20:.1f} MiB, m × the parameters); the inverse
{fl["finv"]:,} ({fl["finv"] * 4 / 2**20:.1f} MiB, ≈ B × the parameters)."""


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = make_config(args)
    data = load(cfg)
    start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs = [run_seed(cfg, data, seed) for seed in range(cfg.seeds)]
    record = {
        "dataset": data.name,
        "input_size": int(np.prod(data.x_train.shape[1:])),
        "command": " ".join(["python -m experiments.oneshot_obs", *argv]),
        "config": dataclasses.asdict(cfg),
        "meta": run_meta(start, started),
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"oneshot-obs-{data.name}-{cfg.model}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"Wrote {path}.")
    print(markdown(summarize(record)))
    if args.write_docs:
        doc = Path(args.docs_page or REPO / "docs" / "results" / "oneshot-obs.md")
        write_section(doc, f"oneshot-obs:{cfg.model}", section(record))
    return record


if __name__ == "__main__":
    main()
