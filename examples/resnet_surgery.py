"""Prune whole channels of a ResNet-style CNN from its traced graph, cut them out, time it.

1. Train a small ResNet (examples/resnet.py: conv-BN-relu stem, two stages of basic blocks
   with identity and 1x1-projection shortcuts, global average pooling, dense head) on
   scikit-learn's 8x8 digits with Adam.
2. Trace it once (:func:`fisher_optax.depgraph.dependency_graph`): the residual adds couple
   the channels of every layer writing into a stage's stream, BatchNorm follows its conv,
   the head's rows follow the last stage. Print the groups and what is kept whole.
3. Score every channel group by the OBD saliency 0.5 * F * w^2 (F read from Adam's ``nu``
   by :func:`fisher_optax.fisher_from_state`) summed over all the weights it removes, and
   remove ``--sparsity`` of the prunable channels (of each group with ``--scope group``).
4. Cut: a smaller ResNet of the same class, which :func:`~fisher_optax.depgraph.cut` checks
   against the masked model (removed entries zeroed) on the example batch; the script checks
   it again on the whole test set. Params, FLOPs (XLA's cost analysis) and the median time
   of a jitted forward pass over the test set (interleaved repeats) are compared at that
   identical accuracy.
5. Fine-tune the shrunk model briefly, Adam's moments sliced to the new shapes
   (:func:`~fisher_optax.depgraph.cut_optimizer`), and report its accuracy.

Data, training loop and timing come from examples/common.py.

Run: python examples/resnet_surgery.py           (a few minutes on two CPU cores)
     python examples/resnet_surgery.py --quick   (a smoke run)
"""

import argparse
import time

import jax.numpy as jnp
import numpy as np
import optax
from common import accuracy, load_digits, median_times, predict, train
from flax import nnx
from resnet import make_resnet

import fisher_optax
from fisher_optax import depgraph
from fisher_optax.flax import param_count_and_flops


def widths(model) -> list[int]:
    return [m.out_features for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=2, help="basic blocks per stage")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--sparsity", type=float, default=0.5, help="fraction of channels removed")
    ap.add_argument("--scope", default="group", choices=["global", "group"])
    ap.add_argument("--criterion", default="saliency", choices=["saliency", "fisher", "magnitude"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run (width 4, 60 steps)")
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.blocks, args.steps, args.finetune_steps, args.repeats = 4, 1, 60, 20, 3

    data = load_digits()
    rng = np.random.default_rng(args.seed)
    model = make_resnet(args.width, args.seed, blocks=args.blocks)
    optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)

    # 1. Train.
    t0 = time.perf_counter()
    loss = train(model, optimizer, data, args.steps, args.batch, rng)
    acc_dense = accuracy(model, data.x_test, data.y_test)
    print(
        f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s, loss {loss:.3f}, "
        f"test accuracy {acc_dense:.4f}"
    )

    # 2. The dependency graph, from one trace on a few test images.
    x_test = jnp.asarray(data.x_test)
    graph = depgraph.dependency_graph(model, x_test[:8])
    print(graph.report().split("\n" + str(len(graph.frozen)) + " parameter axes")[0])
    reasons = sorted({f.reason for f in graph.frozen})
    print(f"{len(graph.frozen)} parameter axes kept whole, because: {'; '.join(reasons)}")

    # 3. Scores from Adam's second moment; the mask over channel groups.
    params = nnx.state(model, nnx.Param)
    fisher = fisher_optax.fisher_from_state(optimizer, batch_size=args.batch, params=params)
    scores = depgraph.group_scores(graph, params, args.criterion, fisher=fisher)
    keep = depgraph.group_mask(graph, scores, args.sparsity, scope=args.scope)
    removed = sum(int((~k).sum()) for k in keep)
    total = sum(g.size for g in graph.groups)
    print(f"removing {removed} of {total} prunable channels ({args.criterion}, {args.scope})")

    # 4. Cut (checked against the masked model inside cut), then check on the test set.
    masked_model = depgraph.masked(model, graph, keep)
    small = depgraph.cut(model, graph, keep)
    small_opt = depgraph.cut_optimizer(optimizer, graph, keep, model=small)
    diff = float(np.max(np.abs(predict(small, x_test) - predict(masked_model, x_test))))
    acc_masked = accuracy(masked_model, data.x_test, data.y_test)
    acc_small = accuracy(small, data.x_test, data.y_test)
    print(f"conv widths: {widths(model)} -> {widths(small)}")
    print(f"max |shrunk - masked| logit difference on the test set: {diff:.2e}")
    n_dense, f_dense = param_count_and_flops(masked_model, x_test[:1])
    n_small, f_small = param_count_and_flops(small, x_test[:1])
    t_dense, t_small = median_times([masked_model, small], x_test, args.repeats)

    # 5. Fine-tune the shrunk model, Adam's moments carried over.
    t0 = time.perf_counter()
    train(small, small_opt, data, args.finetune_steps, args.batch, rng)
    acc_tuned = accuracy(small, data.x_test, data.y_test)
    print(
        f"fine-tuned the shrunk model {args.finetune_steps} steps in "
        f"{time.perf_counter() - t0:.1f} s: test accuracy {acc_small:.4f} -> {acc_tuned:.4f}"
    )

    print()
    print(f"| model | test acc | params | FLOPs/image | median ms / {len(x_test)} images |")
    print("|---|---|---|---|---|")
    print(f"| dense (trained) | {acc_dense:.4f} | {n_dense:,} | {f_dense:,.0f} | |")
    print(
        f"| masked dense | {acc_masked:.4f} | {n_dense:,} | {f_dense:,.0f} | {1e3 * t_dense:.2f} |"
    )
    print(f"| shrunk | {acc_small:.4f} | {n_small:,} | {f_small:,.0f} | {1e3 * t_small:.2f} |")
    print(f"| shrunk, fine-tuned | {acc_tuned:.4f} | {n_small:,} | {f_small:,.0f} | |")
    print(
        f"| ratio masked/shrunk | | {n_dense / n_small:.2f}x | {f_dense / f_small:.2f}x | "
        f"{t_dense / t_small:.2f}x |"
    )
    return {
        "acc_dense": acc_dense,
        "acc_masked": acc_masked,
        "acc_small": acc_small,
        "acc_tuned": acc_tuned,
        "max_diff": diff,
        "removed": removed,
        "total": total,
        "params": (n_dense, n_small),
        "flops": (f_dense, f_small),
        "times": (t_dense, t_small),
    }


if __name__ == "__main__":
    main()
