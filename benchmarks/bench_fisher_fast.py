"""Exact Fisher diagonals: ``method="layers"`` (closed forms per layer) against ``"vmap"``.

Both ``empirical_fisher`` and ``monte_carlo_fisher`` on an MLP 784-1024-1024-10 (1.86M
params) and on Caffe's LeNet-5 (conv 5x5x20 VALID, max-pool 2, conv 5x5x50 VALID, max-pool
2, dense 500 relu, dense 10; 431,080 params), B = 256, random MNIST-shaped inputs. Each
function is jitted and compiled first; then the two methods are timed interleaved (so load
from other processes hits both alike) and the ratio of median times is printed with the
largest relative difference between their results (leaf by leaf, relative to the leaf's
largest entry). A plain batch gradient is timed alongside as the scale.

    python benchmarks/bench_fisher_fast.py            # B = 256, 7 rounds
    python benchmarks/bench_fisher_fast.py --quick    # B = 64, 3 rounds
"""

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo

DN = ("NHWC", "HWIO", "NHWC")


def mlp_model(key):
    sizes = (784, 1024, 1024, 10)
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        key, sub = jax.random.split(key)
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(sub, (a, b)) / np.sqrt(a),
            "bias": jnp.zeros(b),
        }

    def logits(p, x):
        h = x.reshape(x.shape[0], -1)
        for i in range(3):
            h = h @ p[f"dense{i}"]["kernel"] + p[f"dense{i}"]["bias"]
            h = jax.nn.relu(h) if i < 2 else h
        return h

    return params, logits


def lenet_model(key):
    k = jax.random.split(key, 4)
    params = {
        "conv1": {"kernel": jax.random.normal(k[0], (5, 5, 1, 20)) * 0.2, "bias": jnp.zeros(20)},
        "conv2": {"kernel": jax.random.normal(k[1], (5, 5, 20, 50)) * 0.05, "bias": jnp.zeros(50)},
        "ip1": {"kernel": jax.random.normal(k[2], (800, 500)) * 0.035, "bias": jnp.zeros(500)},
        "ip2": {"kernel": jax.random.normal(k[3], (500, 10)) * 0.045, "bias": jnp.zeros(10)},
    }

    def pool(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    def logits(p, x):
        for name in ("conv1", "conv2"):
            y = jax.lax.conv_general_dilated(
                x, p[name]["kernel"], (1, 1), "VALID", dimension_numbers=DN
            )
            x = pool(y + p[name]["bias"])
        h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["ip1"]["kernel"] + p["ip1"]["bias"])
        return h @ p["ip2"]["kernel"] + p["ip2"]["bias"]

    return params, logits


def max_relative_difference(a, b):
    return max(
        float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v)))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def interleaved(fns, rounds):
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    batch_size, rounds = (64, 3) if args.quick else (256, 7)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, B = {batch_size}, "
        f"medians of {rounds} interleaved rounds"
    )
    print(
        "| model | Fisher | vmap (s) | layers (s) | vmap / layers | layers / batch grad "
        "| max rel. diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, build in (("MLP 784-1024-1024-10", mlp_model), ("LeNet-5", lenet_model)):
        bench_model(name, *build(jax.random.key(0)), batch_size, rounds)


def bench_model(name, params, logits, batch_size, rounds):
    x = jax.random.normal(jax.random.key(1), (batch_size, 28, 28, 1))
    batch = {"x": x, "y": jnp.arange(batch_size) % 10}

    def loss(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, b["x"]), b["y"]).mean()

    grad = jax.jit(jax.grad(loss))
    jax.block_until_ready(grad(params, batch))
    variants = {
        "empirical": lambda p, m: fo.empirical_fisher(loss, p, batch, method=m),
        "Monte Carlo": lambda p, m: fo.monte_carlo_fisher(
            logits, p, x, key=jax.random.key(2), method=m
        ),
    }
    for fisher_name, fisher in variants.items():
        fns = {m: jax.jit(lambda p, m=m, fisher=fisher: fisher(p, m)) for m in ("vmap", "layers")}
        results = {m: jax.block_until_ready(f(params)) for m, f in fns.items()}  # compile
        calls = {m: (lambda f=f: f(params)) for m, f in fns.items()}
        t = interleaved({"grad": lambda: grad(params, batch), **calls}, rounds)
        diff = max_relative_difference(results["layers"], results["vmap"])
        print(
            f"| {name} | {fisher_name} | {t['vmap']:.3f} | {t['layers']:.3f} | "
            f"{t['vmap'] / t['layers']:.1f}x | {t['layers'] / t['grad']:.2f}x | {diff:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
