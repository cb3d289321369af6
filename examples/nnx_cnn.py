"""Prune an nnx CNN while it trains, cut whole units out, and time the smaller model.

1. Train a CNN on scikit-learn's 8x8 digits with
   ``nnx.Optimizer(model, fisher_optax.pruned(optax.adam(...), ...), wrt=nnx.Param)`` under
   ``nnx.jit``: unstructured two-stage (magnitude, then Fisher) pruning grows the mask.
2. Score whole units (conv channels, dense columns) by their summed OBD saliency
   0.5 * F * w^2, with the Fisher read from the optimizer's own Adam state, and drop a
   fraction of each hidden layer's units: their incoming weights and biases are zeroed in
   the model (relu(0) = 0, so nothing is left to fold into the next layer, which lets the
   zero-padded convolutions lose channels exactly).
3. Surgery: ``fisher_optax.flax.shrink(model, optimizer, unit_mask=...)`` returns a
   physically smaller model and its optimizer with Adam's moments sliced to the new shapes.
   ``shrink`` itself checks, layer by layer on a probe input, that the shrunk model computes
   what the masked dense model computes; the script checks it again on the test set. Params,
   FLOPs and the median time of a jitted forward pass over the test set are compared at that
   (identical) accuracy.
4. Fine-tune the shrunk model, continuing Adam and the pruning mask where they were. The
   ``pruned`` schedule keeps its target sparsity, which now applies to the smaller model:
   the fine-tune prunes it further, to that fraction of its own weights.

Run: python examples/nnx_cnn.py            (about a minute on two CPU cores)
     python examples/nnx_cnn.py --quick    (a smoke run)
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fisher_optax
import fisher_optax.flax as ff

if __package__ in (None, ""):
    # Run as a script: put the repository root on the path so examples.* imports.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.datasets import load_digits_dataset


def flatten(x):
    return x.reshape(x.shape[0], -1)  # NHWC order, which surgery expects


def make_model(width: int, seed: int) -> nnx.Sequential:
    rngs = nnx.Rngs(seed)
    return nnx.Sequential(
        nnx.Conv(1, width, (3, 3), padding="SAME", rngs=rngs), nnx.relu,
        nnx.Conv(width, 2 * width, (3, 3), padding="SAME", rngs=rngs), nnx.relu, flatten,
        nnx.Linear(2 * width * 64, 4 * width, rngs=rngs), nnx.relu,
        nnx.Linear(4 * width, 10, rngs=rngs),
    )  # fmt: skip


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model, x):
    return model(x)


def accuracy(model, x, y) -> float:
    return float((np.asarray(predict(model, x)).argmax(-1) == y).mean())


def train(model, optimizer, data, steps, batch, rng) -> float:
    loss = float("nan")
    for _ in range(steps):
        idx = rng.choice(len(data.y_train), batch, replace=False)
        loss = float(train_step(model, optimizer, data.x_train[idx], data.y_train[idx]))
    return loss


def nonzero(model) -> int:
    return sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def median_times(models, x, repeats):
    """Median seconds per jitted forward pass; calls interleaved so load drifts hit all."""
    fns = []
    for m in models:
        graphdef, state = nnx.split(m)
        fn = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
        fn(state, x).block_until_ready()  # compile
        fns.append((fn, state))
    times = [[] for _ in models]
    for _ in range(repeats):
        for i, (fn, state) in enumerate(fns):
            t = time.perf_counter()
            fn(state, x).block_until_ready()
            times[i].append(time.perf_counter() - t)
    return [float(np.median(t)) for t in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--sparsity", type=float, default=0.8, help="unstructured target")
    ap.add_argument("--unit-fraction", type=float, default=0.5, help="units dropped per layer")
    ap.add_argument("--criterion", default="saliency", choices=["saliency", "fisher", "magnitude"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.width, args.steps, args.finetune_steps, args.repeats = 8, 120, 40, 5

    data = load_digits_dataset()
    rng = np.random.default_rng(args.seed)
    model = make_model(args.width, args.seed)
    schedule = fisher_optax.polynomial_sparsity(
        args.sparsity, begin_step=args.steps // 8, end_step=args.steps // 2
    )
    tx = fisher_optax.pruned(
        optax.adam(1e-3), schedule=schedule, method="two_stage", update_every=25
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    # 1. Train with unstructured two-stage pruning.
    t0 = time.perf_counter()
    loss = train(model, optimizer, data, args.steps, args.batch, rng)
    print(
        f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s, loss {loss:.3f}, "
        f"test accuracy {accuracy(model, data.x_test, data.y_test):.4f}, "
        f"{nonzero(model)} non-zero params"
    )

    # 2. Structured: drop the least salient units of each hidden layer.
    params = nnx.state(model, nnx.Param)
    # The optimizer is a pytree holding Adam's state; params= lines the result up with it.
    fisher = fisher_optax.fisher_from_state(optimizer, batch_size=args.batch, params=params)
    scores = fisher_optax.unit_scores(params, args.criterion, fisher=fisher)
    units = fisher_optax.unit_mask(
        scores, args.unit_fraction, scope="layer", prunable=ff.prunable_units(model)
    )
    ff.apply_mask_to_model(model, fisher_optax.expand_unit_mask(params, units, bias=True))
    acc_masked = accuracy(model, data.x_test, data.y_test)

    # 3. Surgery; the optimizer state follows.
    small, small_opt, _, _ = ff.shrink(model, optimizer, unit_mask=units)
    x_test = jnp.asarray(data.x_test)
    diff = float(jnp.max(jnp.abs(predict(small, x_test) - predict(model, x_test))))
    acc_small = accuracy(small, data.x_test, data.y_test)
    n_dense, f_dense = ff.param_count_and_flops(model, x_test[:1])
    n_small, f_small = ff.param_count_and_flops(small, x_test[:1])
    t_dense, t_small = median_times([model, small], x_test, args.repeats)
    widths = [m.out_features for m in small.layers if isinstance(m, nnx.Linear | nnx.Conv)]
    print(
        f"units kept per layer: {widths} (dense: "
        f"{[m.out_features for m in model.layers if isinstance(m, nnx.Linear | nnx.Conv)]})"
    )
    print(f"max |shrunk - masked| logit difference: {diff:.2e}")
    print()
    print(
        f"| model | test acc | params | non-zero | FLOPs/image | median ms / {len(x_test)} images |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| masked dense | {acc_masked:.4f} | {n_dense:,} | {nonzero(model):,} | "
        f"{f_dense:,.0f} | {1e3 * t_dense:.2f} |"
    )
    print(
        f"| shrunk | {acc_small:.4f} | {n_small:,} | {nonzero(small):,} | "
        f"{f_small:,.0f} | {1e3 * t_small:.2f} |"
    )
    print(
        f"| ratio dense/shrunk | | {n_dense / n_small:.2f}x | | {f_dense / f_small:.2f}x | "
        f"{t_dense / t_small:.2f}x |"
    )

    # 4. Fine-tune the shrunk model, Adam's moments and the pruning mask carried over.
    t0 = time.perf_counter()
    loss = train(small, small_opt, data, args.finetune_steps, args.batch, rng)
    print()
    print(
        f"fine-tuned the shrunk model {args.finetune_steps} steps in "
        f"{time.perf_counter() - t0:.1f} s: loss {loss:.3f}, "
        f"test accuracy {accuracy(small, data.x_test, data.y_test):.4f}, "
        f"{nonzero(small):,} non-zero params (pruned() keeps its {args.sparsity:.0%} target, "
        "now of the smaller model)"
    )


if __name__ == "__main__":
    main()
