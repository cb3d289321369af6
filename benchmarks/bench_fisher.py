"""How good, and how cheap, is the Fisher read from Adam's nu?

Trains a tanh MLP (64-16-10) on scikit-learn's digits with optax.adam for each (b2, steps)
setting and seed, then compares B * bias-corrected nu with the exact empirical Fisher
(`fisher_optax.empirical_fisher`, per-example gradients): Spearman rank correlation and the
median ratio B*nu / F_emp. Also times reading nu against computing F_emp, as a ratio.

Run: python benchmarks/bench_fisher.py [--quick]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import fisher_optax


def loss_fn(p, b):
    h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["w2"] + p["b2"], b["y"]).mean()


def flat(tree):
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])


def ranks(a):
    return np.argsort(np.argsort(a))


def median_time(fn, repeats=5):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer steps")
    args = parser.parse_args()
    settings = [(0.99, 600), (0.999, 600), (0.999, 3000)]
    seeds = [0] if args.quick else [0, 1, 2]
    if args.quick:
        settings = [(0.99, 300)]
    images, labels = load_digits(return_X_y=True)
    data = {"x": jnp.asarray(images / 16.0, jnp.float32), "y": jnp.asarray(labels)}
    batch = 256
    print("| b2 | steps | Spearman(B*nu, F_emp) | median B*nu / F_emp | final loss |")
    print("|---|---|---|---|---|")
    for b2, steps in settings:
        rows = []
        for seed in seeds:
            k1, k2 = jax.random.split(jax.random.key(seed))
            params = {
                "w1": jax.random.normal(k1, (64, 16)) * 0.1,
                "b1": jnp.zeros(16),
                "w2": jax.random.normal(k2, (16, 10)) * 0.1,
                "b2": jnp.zeros(10),
            }
            opt = optax.adam(3e-3, b2=b2)
            state = opt.init(params)

            @jax.jit
            def step(p, s, xb, yb, opt=opt):
                g = jax.grad(loss_fn)(p, {"x": xb, "y": yb})
                u, s = opt.update(g, s, p)
                return optax.apply_updates(p, u), s

            rng = np.random.default_rng(seed)
            for _ in range(steps):
                idx = rng.choice(len(labels), batch, replace=False)
                params, state = step(params, state, data["x"][idx], data["y"][idx])
            exact = flat(fisher_optax.empirical_fisher(loss_fn, params, data))
            adam = flat(fisher_optax.fisher_from_state(state, b2=b2, batch_size=batch))
            live = exact > 0  # pixels that are 0 in every image have no gradient at all
            rows.append(
                (
                    np.corrcoef(ranks(exact), ranks(adam))[0, 1],
                    np.median(adam[live] / exact[live]),
                    float(loss_fn(params, data)),
                )
            )
        r = np.array(rows)
        print(
            f"| {b2} | {steps} | {r[:, 0].mean():.3f} ± {r[:, 0].std():.3f} "
            f"| {r[:, 1].mean():.2f} ± {r[:, 1].std():.2f} | {r[:, 2].mean():.4f} |"
        )

    read = jax.jit(lambda s: fisher_optax.fisher_from_state(s, b2=b2, batch_size=batch))
    exact_fn = jax.jit(lambda p: fisher_optax.empirical_fisher(loss_fn, p, data))
    jax.block_until_ready(read(state))
    jax.block_until_ready(exact_fn(params))
    t_read, t_exact = median_time(lambda: read(state)), median_time(lambda: exact_fn(params))
    print(
        f"\nCost on {len(labels)} examples: empirical_fisher / fisher_from_state = "
        f"{t_exact / t_read:.0f}x (medians of 5)"
    )


if __name__ == "__main__":
    main()
