"""Structured masks: N:M and block selection against the unstructured
``topk_mask`` on the same scores, and against a ``lax.top_k`` N:M (what jaxpruner does).

All jitted, on four 2-D leaves (rows of 1000), timed interleaved (one call of each method
per round), medians over the rounds, as ratios against ``topk_mask`` at 50% timed in the
same run:

- ``topk_mask``: global unstructured top-k at 50% (the baseline);
- ``nm_mask 2:4``: the 2:4 pattern along the rows (4 elementwise passes, no top-k);
- ``nm_selection 2:4 @25%``: a gradual step (the 2:4 winners, then a top-k at 25%);
- ``block_mask 4x4``: global, 50% of the 4 x 4 blocks by summed score;
- ``lax.top_k 2:4``: groups reshaped to ``(-1, 4)``, ``lax.top_k(., 2)`` and a scatter.

Prints a table; no assertions.

    python benchmarks/bench_patterns.py            # 1e6, 1e7
    python benchmarks/bench_patterns.py --quick    # 1e5, 1e6
"""

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import fisher_optax as fo
from fisher_optax.patterns import block_mask, nm_mask, nm_selection


def make_scores(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` scores over four ``(rows, 1000)`` leaves, rows a multiple of 4."""
    rng = np.random.default_rng(seed)
    leaves = {}
    for i, frac in enumerate([0.4, 0.3, 0.2, 0.1]):
        rows = max(4, int(n * frac) // 4000 * 4)
        leaves[f"layer{i}"] = rng.standard_normal((rows, 1000), dtype=np.float32)
    return leaves


def top_k_nm(scores):
    out = {}
    for name, x in scores.items():
        groups = x.T.reshape(-1, 4)  # groups of 4 down each column, as nm_mask's axis=-2
        _, idx = lax.top_k(groups, 2)
        keep = jnp.zeros(groups.shape, bool).at[jnp.arange(groups.shape[0])[:, None], idx].set(True)
        out[name] = keep.reshape(x.shape[::-1]).T
    return out


METHODS = {
    "topk_mask": jax.jit(lambda s: fo.topk_mask(s, 0.5)),
    "nm_mask 2:4": jax.jit(lambda s: nm_mask(s, 2, 4)),
    "nm_selection 2:4 @25%": jax.jit(lambda s: nm_selection(2, 4, scope="global")(s, 0.25)),
    "block_mask 4x4": jax.jit(lambda s: block_mask(s, 0.5, block=(4, 4))),
    "lax.top_k 2:4": jax.jit(top_k_nm),
}


def time_all(scores, rounds: int) -> dict[str, float]:
    scores = jax.device_put(scores)
    for fn in METHODS.values():  # compile and warm up
        jax.block_until_ready(fn(scores))
    times = {name: [] for name in METHODS}
    for _ in range(rounds):
        for name, fn in METHODS.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(scores))
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1e5 and 1e6 only")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    sizes = [100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000]
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {platform.processor() or '?'}")
    # Same answer check (host side): lax.top_k breaks ties its own way, scores are continuous.
    small = make_scores(40_000)
    a = METHODS["nm_mask 2:4"](small)
    b = METHODS["lax.top_k 2:4"](small)
    same = all(bool((a[k] == b[k]).all()) for k in small)
    print(f"nm_mask equals the lax.top_k 2:4 mask on continuous scores: {same}")
    names = list(METHODS)
    print("| n | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for n in sizes:
        scores = make_scores(n)
        size = sum(x.size for x in scores.values())
        med = time_all(scores, args.rounds)
        base = med["topk_mask"]
        cells = [f"{med[k]:.3f} s ({med[k] / base:.2f}x)" for k in names]
        print(f"| {size:.0e} | " + " | ".join(cells) + " |", flush=True)
    print("(ratios: median time / median topk_mask time, same run)")


if __name__ == "__main__":
    main()
