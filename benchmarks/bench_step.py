"""Training-step overhead of ``fisher_optax.pruned(adam)`` against plain ``optax.adam``.

An MLP on random MNIST-shaped batches; both steps are jitted and timed interleaved, so
load from other processes hits both alike. Between mask updates ``pruned`` adds a masked
gradient, masked moments and a masked update (all fused into Adam's elementwise update) and
a ``lax.cond`` that skips the selection: the ratio of median step times is the overhead. A
mask-update step (two-stage selection over all kernels, Fisher read from ``nu``) is timed on
its own.

    python benchmarks/bench_step.py            # 784-1024-1024-10 MLP (1.9M params), batch 128
    python benchmarks/bench_step.py --quick    # 784-256-10, fewer steps
"""

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo


def init_mlp(key, sizes):
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        key, sub = jax.random.split(key)
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(sub, (a, b)) / np.sqrt(a),
            "bias": jnp.zeros(b),
        }
    return params


def loss_fn(params, x, y):
    h = x
    n = len(params)
    for i in range(n):
        h = h @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def make_step(opt):
    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def make_update(opt):
    @jax.jit
    def update(grads, state, params):
        return opt.update(grads, state, params)

    return update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    sizes = [784, 256, 10] if args.quick else [784, 1024, 1024, 10]
    steps = 40 if args.quick else args.steps
    batch = 128
    key = jax.random.key(0)
    params = init_mlp(key, sizes)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.key(1), (batch, sizes[0]))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, sizes[-1])

    plain = optax.adam(1e-3)
    # No mask update in the timed steps (the Fisher methods skip count 0, the next is 10**6);
    # they start from an 80% magnitude mask, so the masking does real work.
    wrapped = fo.pruned(optax.adam(1e-3), schedule=fo.constant_sparsity(0.8), update_every=10**6)
    step_plain, step_pruned = make_step(plain), make_step(wrapped)
    upd_plain, upd_pruned = make_update(plain), make_update(wrapped)

    s_plain = plain.init(params)
    s_pruned = wrapped.init(params)._replace(mask=fo.magnitude_mask(params, 0.8))
    p_plain, s_plain = jax.block_until_ready(step_plain(params, s_plain, x, y))
    p_pruned, s_pruned = jax.block_until_ready(step_pruned(params, s_pruned, x, y))
    grads = jax.grad(loss_fn)(params, x, y)
    jax.block_until_ready(
        (upd_plain(grads, s_plain, p_plain), upd_pruned(grads, s_pruned, p_pruned))
    )

    t_plain, t_pruned, u_plain, u_pruned = [], [], [], []
    for _ in range(steps):  # interleaved, so both see the same machine load
        t = time.perf_counter()
        p_plain, s_plain = jax.block_until_ready(step_plain(p_plain, s_plain, x, y))
        t_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        p_pruned, s_pruned = jax.block_until_ready(step_pruned(p_pruned, s_pruned, x, y))
        t_pruned.append(time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(upd_plain(grads, s_plain, p_plain))
        u_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(upd_pruned(grads, s_pruned, p_pruned))
        u_pruned.append(time.perf_counter() - t)

    # A mask-update step: with update_every=1 every step from count 1 on selects a new mask
    # (two-stage, global, from the Fisher in nu); time it from the same count-1 state.
    every = fo.pruned(optax.adam(1e-3), schedule=fo.constant_sparsity(0.8), update_every=1)
    upd_every = make_update(every)
    _, s_every = upd_every(grads, every.init(params), params)  # count 0: no Fisher yet
    jax.block_until_ready(upd_every(grads, s_every, params))
    t_mask = []
    for _ in range(max(3, steps // 20)):
        t = time.perf_counter()
        _, s_new = jax.block_until_ready(upd_every(grads, s_every, params))
        t_mask.append(time.perf_counter() - t)
    selected = sum(int((~m).sum()) for m in jax.tree.leaves(s_new.mask))

    med = lambda v: float(np.median(v)) * 1e3
    print(
        f"# MLP {'-'.join(map(str, sizes))} ({n_params / 1e6:.2f}M params), batch {batch}, "
        f"jax {jax.__version__}, {jax.devices()[0].platform}, medians of {steps} interleaved steps"
    )
    print("| timed | optax.adam | pruned(adam) | ratio |")
    print("|-------|-----------:|-------------:|------:|")
    print(
        f"| train step (grad + update), between mask updates | {med(t_plain):.2f} ms | "
        f"{med(t_pruned):.2f} ms | {med(t_pruned) / med(t_plain):.3f} |"
    )
    print(
        f"| optimizer update only, between mask updates | {med(u_plain):.2f} ms | "
        f"{med(u_pruned):.2f} ms | {med(u_pruned) / med(u_plain):.3f} |"
    )
    print(
        f"| optimizer update at a mask update (two-stage, global) | {med(u_plain):.2f} ms | "
        f"{med(t_mask):.2f} ms | {med(t_mask) / med(u_plain):.1f} |"
    )
    pruned_frac = sum(int((~m).sum()) for m in jax.tree.leaves(s_pruned.mask)) / sum(
        m.size for m in jax.tree.leaves(s_pruned.mask) if m.ndim >= 2
    )
    print(
        f"# pruned fraction of kernels in the timed steps: {pruned_frac:.3f}; "
        f"pruned by one mask update: {selected}"
    )


if __name__ == "__main__":
    main()
