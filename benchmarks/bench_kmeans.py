"""kmeans_1d against scikit-learn's KMeans(n_init=1) and the exact 1-D optimum (kmeans1d).

n values shaped like trained weights (normal, Laplace, and a bimodal "after magnitude
pruning" set with a gap around zero), k = 16 and 256. kmeans_1d is timed jitted, after a
warm-up call, as the median of several runs; scikit-learn is timed once per case in the
same process; so is the host-side NumPy k-means that ``quantize`` runs
(``fisher_optax.kmeans_rows_host`` on one row, init "dp"). Inertia is reported relative to the
exact optimum of the kmeans1d package (a dynamic program in C++). Prints a markdown
table; asserts nothing about time.

    python benchmarks/bench_kmeans.py           # n = 1e6 (the exact optimum at k = 256
                                                #   takes minutes per data set)
    python benchmarks/bench_kmeans.py --quick   # n = 2e4, for CI and a first look
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import kmeans1d
import numpy as np
from sklearn.cluster import KMeans

from fisher_optax import kmeans_1d, kmeans_rows_host


def data(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(0, 0.05, n).astype(np.float32)
    if kind == "laplace":
        return rng.laplace(0, 0.03, n).astype(np.float32)
    x = rng.normal(0, 0.05, 3 * n)  # magnitude pruning leaves a gap around zero
    return x[np.abs(x) > 0.04][:n].astype(np.float32)


def inertia(x: np.ndarray, centroids) -> float:
    """Nearest-centroid inertia in float64, the same for every method."""
    c = np.sort(np.asarray(centroids, np.float64).ravel())
    a = np.searchsorted((c[1:] + c[:-1]) / 2, x.astype(np.float64))
    return float(np.sum((x - c[a]) ** 2))


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()
    jax.block_until_ready(out)  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 2e4 instead of 1e6")
    parser.add_argument("--n", type=int, default=None, help="number of values")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", default="normal,laplace,bimodal")
    parser.add_argument("--ks", default="16,256")
    args = parser.parse_args()
    n = args.n or (20_000 if args.quick else 1_000_000)
    print(f"n = {n}, jax {jax.__version__} on {jax.devices()[0].platform}", flush=True)
    print(
        "\n| data | k | kmeans_1d dp (s) | sklearn n_init=1 (s) | speed-up | "
        "dp vs optimum | linear vs optimum | density vs optimum | sklearn vs optimum | "
        "host dp (s) | host dp vs optimum | exact DP (s) |",
        flush=True,
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for kind in args.kinds.split(","):
        x = data(kind, n)
        xj = jnp.asarray(x)
        for k in (int(s) for s in args.ks.split(",")):
            t_dp, r_dp = timed(lambda xj=xj, k=k: kmeans_1d(xj, k, init="dp"), args.repeats)
            _, r_lin = timed(lambda xj=xj, k=k: kmeans_1d(xj, k, init="linear"), 1)
            _, r_den = timed(lambda xj=xj, k=k: kmeans_1d(xj, k, init="density"), 1)
            t = time.perf_counter()
            host_c, counts, _ = kmeans_rows_host(x[None], k)
            host_c = host_c[0, : counts[0]]
            t_host = time.perf_counter() - t
            t = time.perf_counter()
            sk = KMeans(k, n_init=1, random_state=0).fit(x.reshape(-1, 1))
            t_sk = time.perf_counter() - t
            t = time.perf_counter()
            _, opt_c = kmeans1d.cluster(x.astype(np.float64), k)
            t_opt = time.perf_counter() - t
            opt = inertia(x, opt_c)

            def rel(c, opt=opt, x=x):
                return f"{100 * (inertia(x, c) / opt - 1):+.3f}%"

            print(
                f"| {kind} | {k} | {t_dp:.3f} | {t_sk:.2f} | {t_sk / t_dp:.0f}x | "
                f"{rel(r_dp.centroids)} | {rel(r_lin.centroids)} | {rel(r_den.centroids)} | "
                f"{rel(sk.cluster_centers_)} | {t_host:.3f} | {rel(host_c)} | {t_opt:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
