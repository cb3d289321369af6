"""Prune whole channels of a ResNet-style CNN from its traced graph, cut them out, time it.

1. Train a small ResNet (conv-BN-relu stem, two stages of basic blocks with an identity
   and a 1x1-projection shortcut, global average pooling, dense head) on scikit-learn's
   8x8 digits with Adam.
2. Trace it once (:func:`fisher_optax.depgraph.dependency_graph`): the residual adds couple
   the channels of every layer writing into a stage's stream, BatchNorm follows its conv,
   the head's rows follow the last stage. Print the groups and what is kept whole.
3. Score every channel group by its summed OBD saliency 0.5 * F * w^2 (F read from Adam's
   ``nu``) over all the weights it removes, remove ``--sparsity`` of the channels of each
   group, and cut: a smaller ResNet of the same class, checked against the masked model.
4. Fine-tune the cut model briefly (Adam's moments sliced to the new shapes) and compare
   accuracy, params, FLOPs (XLA's cost analysis) and the median time of a jitted forward
   pass over the test set, shrunk against masked dense.

Run: python examples/resnet_surgery.py           (about a minute on two CPU cores)
     python examples/resnet_surgery.py --quick   (a smoke run)
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
from fisher_optax import depgraph

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.datasets import load_digits_dataset


class Block(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
        self.proj = (
            nnx.Conv(cin, cout, (1, 1), strides=stride, rngs=rngs)
            if cin != cout or stride != 1
            else None
        )

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + (x if self.proj is None else self.proj(x)))


class ResNet(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, width, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.stage1 = nnx.List([Block(width, width, 1, rngs), Block(width, width, 1, rngs)])
        self.stage2 = nnx.List(
            [Block(width, 2 * width, 2, rngs), Block(2 * width, 2 * width, 1, rngs)]
        )
        self.head = nnx.Linear(2 * width, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem(x)))
        for b in (*self.stage1, *self.stage2):
            x = b(x)
        return self.head(x.mean(axis=(1, 2)))


def make_model(width: int, seed: int) -> ResNet:
    return nnx.jit(lambda: ResNet(width, nnx.Rngs(seed)))()  # one compile, not one per op


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
    model.eval()
    return float((np.asarray(predict(model, x)).argmax(-1) == y).mean())


def train(model, optimizer, data, steps, batch, rng) -> float:
    model.train()
    loss = float("nan")
    for _ in range(steps):
        idx = rng.choice(len(data.y_train), batch, replace=False)
        loss = float(train_step(model, optimizer, data.x_train[idx], data.y_train[idx]))
    model.eval()
    return loss


def params_and_flops(model, x) -> tuple[int, float]:
    """Parameter count and XLA's FLOP count of one forward pass on ``x``."""
    n = sum(int(np.size(p)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    graphdef, state = nnx.split(model)
    cost = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile()
    analysis = cost.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return n, float(analysis.get("flops", float("nan")))


def median_times(models, x, repeats) -> list[float]:
    """Median seconds per jitted forward pass; calls interleaved so load drifts hit all."""
    fns = []
    for m in models:
        graphdef, state = nnx.split(m)
        fn = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
        fn(state, x).block_until_ready()  # compile
        fns.append((fn, state))
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, (fn, state) in enumerate(fns):
            t = time.perf_counter()
            fn(state, x).block_until_ready()
            times[i].append(time.perf_counter() - t)
    return [float(np.median(t)) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--sparsity", type=float, default=0.5, help="fraction of channels removed")
    ap.add_argument("--scope", default="group", choices=list(depgraph.GROUP_SCOPES))
    ap.add_argument("--criterion", default="saliency", choices=["saliency", "fisher", "magnitude"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.width, args.steps, args.finetune_steps, args.repeats = 8, 60, 20, 3

    data = load_digits_dataset()
    rng = np.random.default_rng(args.seed)
    model = make_model(args.width, args.seed)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    t0 = time.perf_counter()
    loss = train(model, optimizer, data, args.steps, args.batch, rng)
    acc_dense = accuracy(model, data.x_test, data.y_test)
    print(
        f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s, loss {loss:.3f}, "
        f"test accuracy {acc_dense:.4f}"
    )

    x_test = jnp.asarray(data.x_test)
    graph = depgraph.dependency_graph(model, x_test[:8])
    print(graph.report().split("parameter axes kept whole")[0].rstrip(" 0123456789"))
    frozen_reasons = sorted({f.reason for f in graph.frozen})
    print(f"{len(graph.frozen)} parameter axes kept whole, because: {frozen_reasons}")

    params = nnx.state(model, nnx.Param)
    fisher = fisher_optax.fisher_from_state(optimizer, batch_size=args.batch, params=params)
    scores = depgraph.group_scores(graph, params, args.criterion, fisher=fisher)
    keep = depgraph.group_mask(graph, scores, args.sparsity, scope=args.scope)
    removed = sum(int((~k).sum()) for k in keep)
    total = sum(g.size for g in graph.groups)
    print(f"removing {removed} of {total} prunable channels ({args.criterion}, {args.scope})")

    masked_model = depgraph.masked(model, graph, keep)
    small = depgraph.cut(model, graph, keep)  # raises if it differs from masked_model
    small_opt = depgraph.cut_optimizer(optimizer, model, small, graph, keep)
    diff = float(jnp.max(jnp.abs(predict(small, x_test) - predict(masked_model, x_test))))
    acc_masked = accuracy(masked_model, data.x_test, data.y_test)
    acc_small = accuracy(small, data.x_test, data.y_test)
    print(f"max |shrunk - masked| logit difference on the test set: {diff:.2e}")

    t0 = time.perf_counter()
    train(small, small_opt, data, args.finetune_steps, args.batch, rng)
    acc_tuned = accuracy(small, data.x_test, data.y_test)
    print(
        f"fine-tuned the shrunk model {args.finetune_steps} steps in "
        f"{time.perf_counter() - t0:.1f} s: test accuracy {acc_small:.4f} -> {acc_tuned:.4f}"
    )

    n_dense, f_dense = params_and_flops(masked_model, x_test[:1])
    n_small, f_small = params_and_flops(small, x_test[:1])
    t_dense, t_small = median_times([masked_model, small], x_test, args.repeats)
    print()
    print(f"| model | test acc | params | FLOPs/image | median ms / {len(x_test)} images |")
    print("|---|---|---|---|---|")
    print(f"| dense (trained) | {acc_dense:.4f} | {n_dense:,} | {f_dense:,.0f} | |")
    print(
        f"| masked dense | {acc_masked:.4f} | {n_dense:,} | {f_dense:,.0f} | {1e3 * t_dense:.2f} |"
    )
    print(
        f"| shrunk, fine-tuned | {acc_tuned:.4f} | {n_small:,} | {f_small:,.0f} | "
        f"{1e3 * t_small:.2f} |"
    )
    print(
        f"| ratio masked/shrunk | | {n_dense / n_small:.2f}x | {f_dense / f_small:.2f}x | "
        f"{t_dense / t_small:.2f}x |"
    )


if __name__ == "__main__":
    main()
