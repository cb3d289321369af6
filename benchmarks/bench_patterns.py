"""Structured masks: N:M and block selection against the unstructured
``select`` on the same scores, and against a ``lax.top_k`` N:M (what jaxpruner does).

All jitted, on four 2-D leaves (rows of 1000), timed interleaved (one call of each pattern
per round), medians over the rounds, as ratios against the unstructured ``select`` at 50%
timed in the same run:

- ``Unstructured``: global unstructured top-k at 50% (the baseline);
- ``NM 2:4``: the full 2:4 pattern along the rows (4 elementwise passes, no top-k);
- ``NM 2:4 @25%``: a gradual step (the 2:4 winners, then a top-k at 25%);
- ``Blocks 4x4``: global, 50% of the 4 x 4 blocks by summed score;
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
        groups = x.T.reshape(-1, 4)  # groups of 4 down each column, as NM's axis=-2
        _, idx = lax.top_k(groups, 2)
        keep = jnp.zeros(groups.shape, bool).at[jnp.arange(groups.shape[0])[:, None], idx].set(True)
        out[name] = keep.reshape(x.shape[::-1]).T
    return out


PATTERNS = {
    "Unstructured": jax.jit(lambda s: fo.select(s, 0.5)),
    "NM 2:4": jax.jit(lambda s: fo.select(s, 1.0, pattern=fo.NM(2, 4, axis=-2))),
    "NM 2:4 @25%": jax.jit(
        lambda s: fo.select(s, 0.25, pattern=fo.NM(2, 4, scope="global", axis=-2))
    ),
    "Blocks 4x4": jax.jit(lambda s: fo.select(s, 0.5, pattern=fo.Blocks((4, 4), axes=(-2, -1)))),
    "lax.top_k 2:4": jax.jit(top_k_nm),
}


def time_all(scores, rounds: int) -> dict[str, float]:
    scores = jax.device_put(scores)
    for fn in PATTERNS.values():  # compile and warm up
        jax.block_until_ready(fn(scores))
    times = {name: [] for name in PATTERNS}
    for _ in range(rounds):
        for name, fn in PATTERNS.items():
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
    a = PATTERNS["NM 2:4"](small)
    b = PATTERNS["lax.top_k 2:4"](small)
    same = all(bool((a[k] == b[k]).all()) for k in small)
    print(f"NM 2:4 equals the lax.top_k 2:4 mask on continuous scores: {same}")
    names = list(PATTERNS)
    print("| n | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for n in sizes:
        scores = make_scores(n)
        size = sum(x.size for x in scores.values())
        med = time_all(scores, args.rounds)
        base = med["Unstructured"]
        cells = [f"{med[k]:.3f} s ({med[k] / base:.2f}x)" for k in names]
        print(f"| {size:.0e} | " + " | ".join(cells) + " |", flush=True)
    print("(ratios: median time / median Unstructured time, same run)")


if __name__ == "__main__":
    main()
