"""Compile time against the number of leaves: ``pruned(adam)`` and ``jit(magnitude_mask)``.

A model of ``n`` kernels of 32x32. Compile time is the wall time of
``jax.jit(f).lower(*args).compile()``, the median over fresh functions (a new closure each
time, so nothing is cached). Printed as ratios taken in one run:

- the update of ``pruned(adam)`` (two-stage, Fisher, global scope) over plain
  ``optax.adam``'s update on the same leaves;
- ``jax.jit(magnitude_mask)`` over the ``n`` leaves over one leaf of the same total size.

Each ratio is also given for the CPU time of this process (XLA's compiler threads
included), which other jobs on a shared machine disturb less than the wall time.

    python benchmarks/bench_compile.py                      # 16, 64 and 256 leaves
    python benchmarks/bench_compile.py --leaves 16 --repeats 1   # quick
    python benchmarks/bench_compile.py --leaves 64 --one-leaf    # one kernel of 64 * 32 rows

With ``--one-leaf`` the model is one kernel of the same total size: what compiling costs
whatever the number of leaves.

The floor column compiles a hand-written update that does what ``pruned`` does at its least:
Adam on the masked gradients, the masked updates, and under the same ``lax.cond`` a new
mask from a global magnitude threshold read off one ``jnp.sort`` of every weight (one
stage, no exact count on ties). XLA:CPU compiles a sort quickly and runs it slowly (see
``bench_select.py``: 130-210x the counting passes at 1e6-1e7 scores).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo


def compile_time(make, args, repeats):
    """Medians of the wall time and of the process CPU time (all threads) of
    ``jax.jit(make()).lower(*args).compile()`` over fresh functions."""
    wall, cpu = [], []
    for _ in range(repeats):
        fn = make()
        c, t = time.process_time(), time.perf_counter()
        jax.jit(fn).lower(*args).compile()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return float(np.median(wall)), float(np.median(cpu))


def kernels(n, shape=(32, 32)):
    keys = jax.random.split(jax.random.key(0), n)
    return {f"k{i:03d}": jax.random.normal(keys[i], shape) for i in range(n)}


def update_fn(opt):
    def make():
        return lambda g, s, p: opt.update(g, s, p)

    return make


def floor_fn(every=10):
    """A hand-written masked Adam whose mask update is a sort threshold (see the docstring)."""
    adam = optax.adam(1e-3)

    def update(g, state, p):
        inner, mask, count = state

        def recompute():
            flat = jnp.concatenate([jnp.abs(x).ravel() for x in jax.tree.leaves(p)])
            t = jnp.sort(flat)[flat.size // 2]
            return jax.tree.map(lambda x: jnp.abs(x) > t, p)

        mask = jax.lax.cond(count % every == 0, recompute, lambda: mask)
        g = jax.tree.map(lambda x, m: jnp.where(m, x, 0.0), g, mask)
        u, inner = adam.update(g, inner, p)
        u = jax.tree.map(lambda x, m, w: jnp.where(m, x, -w), u, mask, p)
        return u, (inner, mask, count + 1)

    def init(p):
        return adam.init(p), jax.tree.map(lambda x: jnp.ones_like(x, bool), p), jnp.int32(0)

    return init, update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one-leaf", action="store_true", help="one kernel of n * 32 rows")
    args = parser.parse_args()
    print(
        f"# jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{'one kernel of (32 n, 32)' if args.one_leaf else 'n kernels of 32x32'}, "
        f"median of {args.repeats} fresh compiles, seconds"
    )
    print(
        "| leaves | adam update | pruned(adam) update | ratio | ratio of CPU times "
        "| floor | floor / adam | magnitude_mask, one leaf | magnitude_mask, n leaves | ratio "
        "| ratio of CPU times |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.leaves:
        params = kernels(1, (n * 32, 32)) if args.one_leaf else kernels(n)
        grads = jax.tree.map(jnp.ones_like, params)
        adam = optax.adam(1e-3)
        wrapped = fo.pruned(
            optax.adam(1e-3),
            schedule=fo.constant_sparsity(0.5),
            criterion="fisher",
            method="two_stage",
            update_every=10,
        )
        t_adam, c_adam = compile_time(
            update_fn(adam), (grads, adam.init(params), params), args.repeats
        )
        t_pruned, c_pruned = compile_time(
            update_fn(wrapped), (grads, wrapped.init(params), params), args.repeats
        )
        floor_init, floor_update = floor_fn()
        t_floor, _ = compile_time(
            update_fn(optax.GradientTransformation(floor_init, floor_update)),
            (grads, floor_init(params), params),
            args.repeats,
        )
        one = {"k": jax.random.normal(jax.random.key(1), (n * 32, 32))}
        mask_fn = lambda: lambda p: fo.magnitude_mask(p, 0.5)
        t_one, c_one = compile_time(mask_fn, (one,), args.repeats)
        t_many, c_many = compile_time(mask_fn, (params,), args.repeats)
        print(
            f"| {n} | {t_adam:.2f} | {t_pruned:.2f} | {t_pruned / t_adam:.1f} "
            f"| {c_pruned / c_adam:.1f} | {t_floor:.2f} | {t_floor / t_adam:.1f} "
            f"| {t_one:.2f} | {t_many:.2f} | {t_many / t_one:.1f} "
            f"| {c_many / c_one:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
