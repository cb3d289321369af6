"""Prune an nnx CNN while it trains, cut whole units out, and time the smaller model.

1. Train a CNN on scikit-learn's 8x8 digits with
   ``nnx.Optimizer(model, fisher_optax.pruned(optax.adam(...), ...), wrt=nnx.Param)`` under
   ``nnx.jit``: unstructured two-stage (magnitude, then Fisher) pruning grows the mask.
2. Trace the model once (:func:`fisher_optax.depgraph.dependency_graph`): each hidden
   layer's output channels form a group with the next layer's input rows (a block of rows
   per channel through the flatten). Score every unit by its summed OBD saliency
   0.5 * F * w^2 over all the weights it removes, with the Fisher read from the
   optimizer's own Adam state, and remove a fraction of each group's units: their weights
   are zeroed in the model (:func:`~fisher_optax.depgraph.weight_mask`).
3. The cut (:func:`~fisher_optax.depgraph.cut`) returns a physically smaller model,
   checked against the masked dense model on the traced batch; the script checks it again
   on the test set. :func:`~fisher_optax.depgraph.cut_optimizer` slices Adam's moments and
   the pruning mask to the new shapes. Params, FLOPs and the median time of a jitted
   forward pass over the test set are compared at that (identical) accuracy.
4. Fine-tune the shrunk model, continuing Adam and the pruning mask where they were. The
   ``pruned`` schedule keeps its target sparsity, which now applies to the smaller model:
   the fine-tune prunes it further, to that fraction of its own weights.

Data, training loop and timing come from examples/common.py.

Run: python examples/nnx_cnn.py            (about a minute on two CPU cores)
     python examples/nnx_cnn.py --quick    (a smoke run)
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import accuracy, load_digits, median_times, predict, train
from flax import nnx

import fisher_optax
import fisher_optax.flax as ff
from fisher_optax import depgraph


def flatten(x):
    return x.reshape(x.shape[0], -1)


def make_model(width: int, seed: int) -> nnx.Sequential:
    rngs = nnx.Rngs(seed)
    return nnx.Sequential(
        nnx.Conv(1, width, (3, 3), padding="SAME", rngs=rngs), nnx.relu,
        nnx.Conv(width, 2 * width, (3, 3), padding="SAME", rngs=rngs), nnx.relu, flatten,
        nnx.Linear(2 * width * 64, 4 * width, rngs=rngs), nnx.relu,
        nnx.Linear(4 * width, 10, rngs=rngs),
    )  # fmt: skip


def nonzero(model) -> int:
    return sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--sparsity", type=float, default=0.8, help="unstructured target")
    ap.add_argument("--unit-fraction", type=float, default=0.5, help="units removed per group")
    ap.add_argument("--criterion", default="saliency", choices=["saliency", "fisher", "magnitude"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.width, args.steps, args.finetune_steps, args.repeats = 8, 120, 40, 5

    data = load_digits()
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

    # 2. Structured: drop the least salient units of each hidden layer. The traced graph
    # groups each layer's output channels with the next layer's input rows (through the
    # flatten, a block of rows per channel); the output layer is the model's output, kept.
    x_test = jnp.asarray(data.x_test)
    graph = depgraph.dependency_graph(model, x_test[:8])
    params = nnx.state(model, nnx.Param)
    # The optimizer is a pytree holding Adam's state; params= lines the result up with it.
    fisher = fisher_optax.fisher_from_state(optimizer, batch_size=args.batch, params=params)
    scores = depgraph.group_scores(graph, params, args.criterion, fisher=fisher)
    keep = depgraph.group_mask(graph, scores, args.unit_fraction, scope="group")
    ff.apply_mask_to_model(model, depgraph.weight_mask(graph, keep, params))
    acc_masked = accuracy(model, data.x_test, data.y_test)

    # 3. The cut, checked against the masked model; the optimizer state follows.
    small = depgraph.cut(model, graph, keep)
    small_opt = depgraph.cut_optimizer(optimizer, graph, keep, model=small)
    diff = float(np.max(np.abs(predict(small, x_test) - predict(model, x_test))))
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
