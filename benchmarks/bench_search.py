"""Which ``jnp.searchsorted`` method finds the nearest codebook entries fastest?

:func:`fisher_optax.fake_quantize` and :func:`fisher_optax.reassign` find each weight's
nearest entry as the number of midpoints between neighbouring entries below it (n entries,
n - 1 midpoints). This times that search on one (800, 500) leaf (LeNet-300-100's fc1) for
codebooks of 4 to 64 entries, jitted, with ``method="scan"`` (a binary-search loop, jnp's
default) and ``method="compare_all"`` (every weight against every midpoint, one fused pass),
and the shipped choice (``compare_all`` up to ``fisher_optax.codebooks._COMPARE_ALL_MAX``
sorted values). Medians of ``--repeats`` calls; ratios within one run.

Run: python benchmarks/bench_search.py [--repeats 30]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fisher_optax import codebooks


def median_ms(f, *args, repeats):
    f(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--entries", type=int, nargs="+", default=[4, 8, 16, 32, 33, 34, 64])
    args = p.parse_args(argv)
    x = jax.random.normal(jax.random.key(0), (800, 500))
    print(f"jax {jax.__version__} {jax.default_backend()}; one (800, 500) leaf; ms, median")
    print("| entries | scan | compare_all | shipped | scan / shipped |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.entries:
        book = jnp.sort(jax.random.normal(jax.random.key(n), (n,)))
        mid = book[:-1] + (book[1:] - book[:-1]) / 2
        ms = {}
        for m in ("scan", "compare_all"):
            f = jax.jit(lambda x, mid, m=m: jnp.searchsorted(mid, x, side="left", method=m))
            ms[m] = median_ms(f, x, mid, repeats=args.repeats)
        shipped = median_ms(jax.jit(codebooks._search), mid, x, repeats=args.repeats)
        print(
            f"| {n} | {ms['scan']:.2f} | {ms['compare_all']:.2f} | {shipped:.2f} "
            f"| {ms['scan'] / shipped:.1f} |"
        )


if __name__ == "__main__":
    main()
