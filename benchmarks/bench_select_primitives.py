"""What the building blocks of a faster selection cost on this backend, against one counting
pass of one candidate (the unit; ``fisher_optax.select`` on sharded scores makes 32).

``select`` finds the exact threshold with byte-wide counting passes. Each row below is
a primitive that a pass-saving design can use, timed as a ratio to one counting pass over
the same uint8 digits in the same run (interleaved rounds, medians). The first rows are
what ``select`` does on unsharded scores: three thresholds per variadic reduction, 16
passes:

- ``m thresholds, one variadic reduction``: counting m candidates per pass, which resolves
  log2(m + 1) bits (break-even ratio: that many passes);
- ``256-bin histogram (scatter-add)``: one radix digit per pass (break-even: 8 passes);
- ``cumsum for compaction``: extracting the candidates near a sampled threshold
  (``jnp.nonzero`` is built on it; break-even: the passes it would save, at most ~24);
- ``pure_callback of the keys``: handing the uint32 keys to NumPy (its introselect), the
  callback alone, without the select;
- ``counting pass, short chunks``: the same count with uint8 partial sums over chunks of
  20 rows, which XLA's tree-reduction rewrite leaves whole.

    python benchmarks/bench_select_primitives.py           # 1.86M and 1e7 entries
    python benchmarks/bench_select_primitives.py --quick   # 1e6
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fisher_optax import _select


def counting_pass(d):
    """One counting pass of select over uint8 digits."""
    return _select.count(d < jnp.uint8(100))


def short_chunks(d):
    p = (d < jnp.uint8(100)).reshape(-1, 20, d.shape[1])
    return jnp.sum(jnp.sum(p, axis=1, dtype=jnp.uint8), dtype=jnp.int32)


def variadic(m):
    def count(d):  # what select does on unsharded scores, with m thresholds
        return _select.count_many([d < jnp.uint8(16 * (j + 1)) for j in range(m)])

    return count


def histogram(d):
    return jnp.zeros(256, jnp.int32).at[d].add(1)


def cumsum(d):
    return jnp.cumsum((d > 90) & (d < 110), dtype=jnp.int32)


def callback(k):
    return jax.pure_callback(
        lambda x: np.zeros(1, np.uint32), jax.ShapeDtypeStruct((1,), jnp.uint32), k
    )


def seconds(fn, arg):
    start = time.perf_counter()
    jax.block_until_ready(fn(arg))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    sizes = [10**6] if args.quick else [1_860_000, 10**7]
    rounds = 3 if args.quick else args.rounds
    rng = np.random.default_rng(0)
    print(
        f"# jax {jax.__version__}, {jax.devices()[0].platform}, medians of {rounds} "
        "interleaved rounds; ratio to one counting pass of select"
    )
    rows = [
        ("3 thresholds, one variadic reduction (2 bits)", variadic(3), "digits"),
        ("7 thresholds, one variadic reduction (3 bits)", variadic(7), "digits"),
        ("15 thresholds, one variadic reduction (4 bits)", variadic(15), "digits"),
        ("256-bin histogram, scatter-add (8 bits)", histogram, "digits"),
        ("cumsum for compaction", cumsum, "digits"),
        ("pure_callback of the uint32 keys, no work", callback, "keys"),
        ("counting pass, short chunks", short_chunks, "digits"),
    ]
    header = "| primitive | " + " | ".join(f"n = {n:.3g}" for n in sizes) + " |"
    print(header)
    print("|---|" + "---:|" * len(sizes))
    cells: dict[str, list[str]] = {name: [] for name, _, _ in rows}
    base_cells = []
    for n in sizes:
        data = {
            "digits": jax.device_put(rng.integers(0, 256, (n // 1000, 1000)).astype(np.uint8)),
            "keys": jax.device_put(rng.integers(0, 2**32, (n // 1000, 1000), dtype=np.uint32)),
        }
        fns = {"pass": (jax.jit(counting_pass), "digits")}
        fns.update({name: (jax.jit(fn), arg) for name, fn, arg in rows})
        for fn, arg in fns.values():
            jax.block_until_ready(fn(data[arg]))  # compile
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, (fn, arg) in fns.items():
                times[name].append(seconds(fn, data[arg]))
        base = float(np.median(times["pass"]))
        base_cells.append(f"{base * 1e3:.2f} ms")
        for name, _, _ in rows:
            cells[name].append(f"{float(np.median(times[name])) / base:.1f}x")
    print("| one counting pass (the unit) | " + " | ".join(base_cells) + " |")
    for name, _, _ in rows:
        print(f"| {name} | " + " | ".join(cells[name]) + " |")


if __name__ == "__main__":
    main()
