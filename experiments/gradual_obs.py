"""Gradual pruning while training: block OBS in ``pruned`` against OBD saliency and magnitude.

oBERT's gradual setting (Kurtic et al. 2022, arXiv:2203.07259) at a small size: train the MLP
784-40-20-10 dense on Fashion-MNIST with Adam, then go on training it with
:func:`fisher_optax.pruned` around the same Adam (its moments and count carried over) while the
target rises as a staircase through the sparsity levels (a ramp of ``ramp`` steps to the next
level, ``hold`` steps at it, the accuracy measured at the end of each hold). The same steps,
batches and learning rate for every method:

- ``magnitude``: ``criterion="magnitude"``;
- ``obd``: ``criterion="saliency"``, :math:`\\tfrac12 F w^2` with the Fisher diagonal read from
  Adam's ``nu``;
- ``obs``: ``criterion=fisher_optax.obs.BlockOBS(block_size, num_grads, damping)``: the
  last ``num_grads`` mini-batch gradients, the OBS saliency and the block update of the
  survivors at each mask update. Its damping is chosen per seed and level on a held-out split
  of the training set, never the test set.

All three rank globally in one stage. ``python -m experiments.gradual_obs`` writes
``results/gradual-obs-<dataset>.json``; ``--write-docs`` also writes its section of
``docs/results/oneshot-obs.md``. ``--smoke`` runs a tiny configuration on sklearn digits in
seconds (the CI test).
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
from experiments.main_job import staircase
from experiments.oneshot_obs import _floats, accuracy, load
from experiments.report import machine_words, markdown, mean_std, run_meta, write_section

REPO = Path(__file__).resolve().parents[1]
METHODS = ("magnitude", "obd", "obs")


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str = "fashion-mnist"
    hidden: tuple[int, ...] = (40, 20)
    seeds: int = 3
    dense_epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    levels: tuple[float, ...] = (0.9, 0.95, 0.98)
    ramp: int = 200
    hold: int = 400
    update_every: int = 20
    block_size: int = 64
    num_grads: int = 64
    dampings: tuple[float, ...] = (1e-6, 1e-5, 1e-4)
    val_size: int = 5000


SMOKE = Config(
    dataset="digits",
    seeds=1,
    dense_epochs=10,
    batch_size=64,
    levels=(0.5, 0.8),
    ramp=10,
    hold=10,
    update_every=5,
    block_size=16,
    num_grads=8,
    dampings=(1e-4,),
    val_size=200,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.gradual_obs", description=__doc__)
    d = Config()
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--levels", type=_floats, default=d.levels, help="e.g. 0.9,0.95,0.98")
    p.add_argument("--block-size", type=int, default=d.block_size, help="OBS block size B")
    p.add_argument("--num-grads", type=int, default=d.num_grads, help="m gradients kept")
    p.add_argument("--dampings", type=_floats, default=d.dampings, help="tuned on held-out")
    p.add_argument("--smoke", action="store_true", help="tiny run on sklearn digits (seconds)")
    p.add_argument("--out", default="results", help="directory of the JSON")
    p.add_argument("--write-docs", action="store_true", help="write the docs section")
    p.add_argument("--docs-page", default=None, help="default: docs/results/oneshot-obs.md")
    p.add_argument("--render", default=None, help="write the docs from this JSON, run nothing")
    return p


def make_config(args: argparse.Namespace) -> Config:
    if args.smoke:
        return SMOKE
    return Config(
        seeds=args.seeds,
        levels=tuple(args.levels),
        block_size=args.block_size,
        num_grads=args.num_grads,
        dampings=tuple(args.dampings),
    )


def trainer(opt: optax.GradientTransformation, model, steps: int, batch_size: int):
    """A jitted run of ``steps`` steps of ``opt`` on random mini-batches of ``(x, y)``."""
    loss = partial(models.loss_fn, model)

    def run(params, state, key, x, y):
        def step(carry, k):
            params, state = carry
            idx = jax.random.randint(k, (batch_size,), 0, x.shape[0])
            grads = jax.grad(loss)(params, x[idx], y[idx])
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(step, (params, state), jax.random.split(key, steps))
        return params, state

    return jax.jit(run)


def pruning_optimizer(criterion, cfg: Config) -> optax.GradientTransformation:
    return fo.pruned(
        optax.adam(cfg.lr),
        staircase(cfg.levels, cfg.ramp, cfg.hold),
        criterion=criterion,
        method="one_stage",
        update_every=cfg.update_every,
    )


def prune_run(criterion, cfg, model, dense, key, split) -> dict:
    """The staircase of one criterion from the dense run: accuracies and seconds per level."""
    params, adam_state = dense
    x_tr, y_tr, x_val, y_val, x_te, y_te = split
    opt = pruning_optimizer(criterion, cfg)
    state = opt.init(params)
    inner = state.inner_state
    state = state._replace(inner_state=(adam_state, *inner[1:]))  # Adam goes on
    run = trainer(opt, model, cfg.ramp + cfg.hold, cfg.batch_size)
    out = []
    for k in jax.random.split(key, len(cfg.levels)):
        t = time.perf_counter()
        params, state = jax.block_until_ready(run(params, state, k, x_tr, y_tr))
        out.append(
            {
                "sparsity": float(fo.sparsity_report(state.mask).sparsity),
                "val": float(accuracy(params, x_val, y_val, model=model)),
                "test": float(accuracy(params, x_te, y_te, model=model)),
                "seconds": time.perf_counter() - t,
            }
        )
    return {"levels": out}


def run_seed(cfg: Config, data: datasets.Dataset, seed: int) -> dict:
    model = models.MLP(hidden=cfg.hidden)
    x_all, y_all = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    split = (
        x_all[: -cfg.val_size],
        y_all[: -cfg.val_size],
        x_all[-cfg.val_size :],
        y_all[-cfg.val_size :],
        jnp.asarray(data.x_test),
        jnp.asarray(data.y_test),
    )
    k_init, k_dense, k_prune = jax.random.split(jax.random.key(seed), 3)
    params = model.init(k_init, split[0].shape[1:])
    adam = optax.adam(cfg.lr)
    steps = cfg.dense_epochs * (split[0].shape[0] // cfg.batch_size)
    params, state = trainer(adam, model, steps, cfg.batch_size)(
        params, adam.init(params), k_dense, split[0], split[1]
    )
    dense = (params, state[0])
    out = {
        "seed": seed,
        "dense": float(accuracy(params, split[4], split[5], model=model)),
        "methods": {},
    }
    criteria = {"magnitude": "magnitude", "obd": "saliency"}
    for name, criterion in criteria.items():
        out["methods"][name] = prune_run(criterion, cfg, model, dense, k_prune, split)
    for d in cfg.dampings:
        surgeon = fo.obs.BlockOBS(block_size=cfg.block_size, num_grads=cfg.num_grads, damping=d)
        out["methods"][f"obs@{d:g}"] = prune_run(surgeon, cfg, model, dense, k_prune, split)
    for i, level in enumerate(cfg.levels):
        runs = {d: out["methods"][f"obs@{d:g}"]["levels"][i] for d in cfg.dampings}
        best = max(cfg.dampings, key=lambda d: (runs[d]["val"], -d))
        row = {m: out["methods"][m]["levels"][i]["test"] for m in criteria}
        print(
            f"seed {seed} level {level:g}: magnitude {row['magnitude']:.3f} obd {row['obd']:.3f} "
            f"obs {runs[best]['test']:.3f} (damping {best:g})",
            flush=True,
        )
    return out


def table(record: dict) -> list[list[str]]:
    """Test accuracy per level and method (OBS at the damping chosen on held-out)."""
    cfg, runs = record["config"], record["runs"]
    rows = [["sparsity", "magnitude", "OBD (Adam nu)", "block OBS", "OBS damping per seed"]]
    for i, level in enumerate(cfg["levels"]):
        cells, chosen = [], []
        for m in ("magnitude", "obd"):
            cells.append(mean_std([r["methods"][m]["levels"][i]["test"] * 100 for r in runs]))
        for r in runs:
            by = {d: r["methods"][f"obs@{d:g}"]["levels"][i] for d in cfg["dampings"]}
            chosen.append(f"{max(cfg['dampings'], key=lambda d, by=by: (by[d]['val'], -d)):g}")
        cells.append(mean_std([_obs_test(r, cfg["dampings"], i) * 100 for r in runs]))
        top = max(round(c[0], 1) for c in cells)
        text = [
            f"**{c[0]:.1f} ± {c[1]:.1f}**" if round(c[0], 1) == top else f"{c[0]:.1f} ± {c[1]:.1f}"
            for c in cells
        ]
        rows.append([f"{level * 100:g}%", *text, ", ".join(chosen)])
    return rows


def _obs_test(run: dict, dampings: list, i: int) -> float:
    """The OBS test accuracy at level ``i`` with the damping chosen on held-out."""
    by = {d: run["methods"][f"obs@{d:g}"]["levels"][i] for d in dampings}
    return by[max(dampings, key=lambda d: (by[d]["val"], -d))]["test"]


def differences(record: dict) -> str:
    """Block OBS minus each baseline per level, paired over seeds, in points."""
    cfg, runs = record["config"], record["runs"]
    parts = []
    for m, label in (("obd", "OBD"), ("magnitude", "magnitude")):
        cells = []
        for i, level in enumerate(cfg["levels"]):
            d = [
                100 * (_obs_test(r, cfg["dampings"], i) - r["methods"][m]["levels"][i]["test"])
                for r in runs
            ]
            mean, std = mean_std(d)
            cells.append(f"{level * 100:g}%: {mean:+.1f} ± {std:.1f}")
        parts.append(f"block OBS minus {label} (points, paired over seeds): " + "; ".join(cells))
    return ". ".join(parts) + "."


def seconds_per_level(record: dict, method: str) -> float:
    """Mean seconds of one level's ``ramp + hold`` steps, the first (compiling) level left out."""
    values = [
        lv["seconds"]
        for r in record["runs"]
        for name, res in r["methods"].items()
        if name == method or name.startswith(method + "@")
        for lv in res["levels"][1:]
    ]
    return float(np.mean(values))


def section(record: dict) -> str:
    cfg, runs, meta = record["config"], record["runs"], record["meta"]
    dense = mean_std([r["dense"] * 100 for r in runs])
    steps = cfg["ramp"] + cfg["hold"]
    sec = {m: seconds_per_level(record, m) for m in METHODS}
    sizes = "-".join(str(h) for h in (record["input_size"], *cfg["hidden"], 10))
    return f"""oBERT's gradual setting at a small size: the MLP {sizes} is trained dense with
Adam for {cfg["dense_epochs"]} epochs (lr {cfg["lr"]}, batch {cfg["batch_size"]}), then trained on
with `pruned` around the same Adam while the target rises through the levels: {cfg["ramp"]} steps of
ramp to the next level, {cfg["hold"]} steps at it, a mask update every {cfg["update_every"]}
steps, the test accuracy at the end of each hold. The same steps and batches for each
criterion, all global and in one stage: `"magnitude"`, `"saliency"` (OBD with Adam's `nu`),
and `obs.BlockOBS(block_size={cfg["block_size"]}, num_grads={cfg["num_grads"]}, damping)`
with the damping chosen among {", ".join(f"{d:g}" for d in cfg["dampings"])} on a held-out split
of the last {cfg["val_size"]} training images, per seed and level.

Command: `{record["command"]}` — wall time {meta["wall_minutes"]:.1f} min ({meta["started_utc"]},
{machine_words(meta)}; jax {meta["jax"]} on {meta["backend"]}), {len(runs)}
seeds. Written by `experiments/gradual_obs.py`.

**Test accuracy (%) after pruning while training** (mean ± std over seeds; best in bold).
Dense: {dense[0]:.1f} ± {dense[1]:.1f}.

{markdown(table(record))}

{differences(record)}

**Cost** (mean seconds of one level's {steps} steps, compiled, this machine): magnitude
{sec["magnitude"]:.2f} s, OBD {sec["obd"]:.2f} s, block OBS {sec["obs"]:.2f} s. Each of the
{steps // cfg["update_every"]} mask updates of a level inverts the block Fisher of the buffer and
solves the update; between them a step only writes its gradients into the
buffer, which holds {cfg["num_grads"]} × the {record["n_params"]:,} parameters."""


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.render:
        record = json.loads(Path(args.render).read_text())
        write_docs(args, record)
        return record
    cfg = make_config(args)
    data = load(cfg)
    start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs = [run_seed(cfg, data, seed) for seed in range(cfg.seeds)]
    input_size = int(np.prod(data.x_train.shape[1:]))
    record = {
        "dataset": data.name,
        "input_size": input_size,
        "n_params": models.n_params(
            models.MLP(hidden=cfg.hidden).init(jax.random.key(0), (input_size,))
        ),
        "command": " ".join(["python -m experiments.gradual_obs", *argv]),
        "config": dataclasses.asdict(cfg),
        "meta": run_meta(start, started),
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gradual-obs-{data.name}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"Wrote {path}.")
    print(markdown(table(record)))
    write_docs(args, record)
    return record


def write_docs(args: argparse.Namespace, record: dict) -> None:
    if args.write_docs:
        doc = Path(args.docs_page or REPO / "docs" / "results" / "oneshot-obs.md")
        write_section(doc, "gradual-obs", section(record))


if __name__ == "__main__":
    main()
