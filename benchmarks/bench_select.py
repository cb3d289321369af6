"""Global mask selection: sort-free counting (fisher_optax.select) vs a full sort vs NumPy.

Every method produces the same thing, a global keep-mask over all leaves pruning exactly
``k = round(s * n)`` of the smallest scores:

- ``fisher_optax``: ``jax.jit(select)``: 16 counting passes over order-preserving keys,
  one byte-wide digit per phase, three candidates counted per pass (plus the tie-break by
  flat index: the same loop goes on over the bytes of the index of the tied entries, and
  only when ties straddle the cut);
- ``argsort``: what existing JAX pruners do: concatenate, ``jnp.argsort``, take the k-th
  value as threshold, compare (jitted; ties not resolved exactly);
- ``np.partition``: NumPy introselect for the k-th value, in place on a concatenated copy
  (into a buffer allocated once per size), compare.

The three are timed interleaved (one run of each per round), so load from other processes
hits them alike; medians over rounds and their ratios are printed. No assertions on time.
The last columns are the memory one call of ours touched for the first time (minor page
faults times the page size), its system CPU time, and the temporaries of the compiled call:
XLA's CPU backend allocates a call's temporaries afresh, and faulting those pages in costs
system time that the in-place ``np.partition`` never pays (above 2**21 scores the selection
stores nothing score-sized but one byte per score, in the output's buffer; the kernel of
commit c80da99 stored about 8 and faulted 810 MB at 1e8).

    python benchmarks/bench_select.py            # 1e6, 1e7, 1e8 (argsort skipped at 1e8)
    python benchmarks/bench_select.py --quick    # 1e5, 1e6
    python benchmarks/bench_select.py --argsort-1e8   # also time argsort at 1e8, once
    python benchmarks/bench_select.py --keys     # stored vs recomputed keys, 1e6 to 3.2e7
    python benchmarks/bench_select.py --ties     # continuous scores vs 8 distinct values
    python benchmarks/bench_select.py --sizes 1e8,1e9 --argsort-1e8   # on a GPU

``--keys`` times the two ways the kernel can give its phases the keys, forced by setting
``fisher_optax._select.STORED_KEYS_MAX`` while each is compiled (ahead of time, so neither
is traced again): stored once (4 bytes a score of temporaries) or recomputed from the scores
in every phase. Their ratio is what that threshold is chosen from.
"""

import argparse
import platform
import resource
import time
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

import fisher_optax as fo
from fisher_optax import _select as select_mod

SPARSITY = 0.9


def n_pruned(n: int) -> int:
    """The count select prunes: the exact product of float32(SPARSITY) and n, rounded."""
    return round(Fraction(float(np.float32(SPARSITY))) * n)


def make_scores(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` scores spread over four 2-D leaves (40%, 30%, 20%, 10% of the total)."""
    rng = np.random.default_rng(seed)
    leaves, used = {}, 0
    for i, frac in enumerate([0.4, 0.3, 0.2]):
        rows = max(1, int(n * frac) // 1000)
        leaves[f"layer{i}"] = rng.standard_normal((rows, 1000), dtype=np.float32)
        used += rows * 1000
    leaves["layer3"] = rng.standard_normal((max(1, (n - used) // 1000), 1000), dtype=np.float32)
    return leaves


@jax.jit
def ours(scores):
    return fo.select(scores, SPARSITY)


@jax.jit
def argsort_baseline(scores):
    flat = jnp.concatenate([x.ravel() for x in scores.values()])
    k = n_pruned(flat.size)
    threshold = flat[jnp.argsort(flat)[k - 1]]
    return {name: x > threshold for name, x in scores.items()}


_BUFFERS: dict[int, np.ndarray] = {}


def numpy_partition(scores):
    # Into a buffer allocated once per size, partitioned in place: a fresh n-sized array per
    # call page-faults on first touch, which made this baseline vary 3.5-fold between runs.
    n = sum(x.size for x in scores.values())
    flat = _BUFFERS.setdefault(n, np.empty(n, np.float32))
    np.concatenate([x.ravel() for x in scores.values()], out=flat)
    k = n_pruned(flat.size)
    flat.partition(k - 1)
    threshold = flat[k - 1]
    return {name: x > threshold for name, x in scores.items()}


def timed(fn, arg, block: bool) -> tuple[float, float, float]:
    """Seconds for one call; the MB of memory it touched for the first time (minor page
    faults: XLA's CPU backend allocates its temporaries afresh at every call); and the
    system CPU seconds of the process during the call (mostly those page faults)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    out = fn(arg)
    if block:
        jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    fresh = (after.ru_minflt - before.ru_minflt) * PAGE / 1e6
    return seconds, fresh, after.ru_stime - before.ru_stime


PAGE = resource.getpagesize()


def keys_table(repeats: int) -> None:
    """Stored vs recomputed keys, interleaved, with the temporaries each compiles to."""
    print("| n | keys stored | recomputed | stored / recomputed | temp MB stored | recomputed |")
    print("|---|---:|---:|---:|---:|---:|")
    default = select_mod.STORED_KEYS_MAX
    for n in [10**6, 2 * 10**6, 4 * 10**6, 8 * 10**6, 16 * 10**6, 32 * 10**6]:
        dev = jax.device_put(make_scores(n))
        compiled = {}
        try:
            for mode, cap in [("stored", 2**62), ("recomputed", 0)]:
                select_mod.STORED_KEYS_MAX = cap
                jax.clear_caches()  # the inner jit of the selection caches its trace
                fn = jax.jit(lambda s: fo.select(s, SPARSITY)).lower(dev).compile()
                compiled[mode] = fn
        finally:
            select_mod.STORED_KEYS_MAX = default
        for fn in compiled.values():
            jax.block_until_ready(fn(dev))
        times = {mode: [] for mode in compiled}
        for _ in range(repeats):
            for mode, fn in compiled.items():
                times[mode].append(timed(fn, dev, block=True)[0])
        med = {mode: float(np.median(t)) for mode, t in times.items()}
        temp = {m: fn.memory_analysis().temp_size_in_bytes / 1e6 for m, fn in compiled.items()}
        print(
            f"| {n:.1e} | {med['stored'] * 1e3:.2f} ms | {med['recomputed'] * 1e3:.2f} ms | "
            f"{med['stored'] / med['recomputed']:.2f} | {temp['stored']:.1f} | "
            f"{temp['recomputed']:.1f} |",
            flush=True,
        )
        del dev


def ties_table(repeats: int) -> None:
    """Continuous scores against scores of 8 distinct values (ties straddle the cut, so the
    loop goes on over the index bytes), interleaved."""
    print("| n | continuous | 8 distinct values | ties / continuous |")
    print("|---|---:|---:|---:|")
    for n in [10**6, 10**7]:
        smooth = jax.device_put(make_scores(n))
        tied = jax.tree.map(lambda x: jnp.floor(jnp.abs(x) * 4).clip(0, 7), smooth)
        jax.block_until_ready((ours(smooth), ours(tied)))
        times = {"smooth": [], "tied": []}
        for _ in range(repeats):
            times["smooth"].append(timed(ours, smooth, block=True)[0])
            times["tied"].append(timed(ours, tied, block=True)[0])
        med = {k: float(np.median(t)) for k, t in times.items()}
        print(
            f"| {n:.0e} | {med['smooth'] * 1e3:.2f} ms | {med['tied'] * 1e3:.2f} ms | "
            f"{med['tied'] / med['smooth']:.2f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--argsort-1e8", action="store_true", help="time argsort at 1e8 once")
    parser.add_argument("--keys", action="store_true", help="stored vs recomputed keys only")
    parser.add_argument("--ties", action="store_true", help="continuous vs tied scores only")
    parser.add_argument(
        "--sizes", help="comma-separated sizes instead of the defaults, e.g. 1e8,1e9 (on a GPU)"
    )
    args = parser.parse_args()
    if args.keys:
        keys_table(max(args.repeats, 15))
        return
    if args.ties:
        ties_table(max(args.repeats, 15))
        return
    sizes = [10**5, 10**6] if args.quick else [10**6, 10**7, 10**8]
    if args.sizes:
        sizes = [int(float(x)) for x in args.sizes.split(",")]
    repeats = 3 if args.quick else args.repeats
    print(
        f"# global selection, sparsity {SPARSITY}, float32, jax {jax.__version__}, "
        f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}), "
        f"medians of {repeats}"
    )
    header = (
        f"| {'n':>5} | {'fisher_optax':>12} | {'argsort':>10} | {'np.partition':>12} | "
        f"{'argsort / ours':>14} | {'ours / np.partition':>19} | {'fresh MB (ours)':>15} | "
        f"{'system s (ours)':>15} | {'temp MB (ours)':>14} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for n in sizes:
        host = make_scores(n)
        dev = jax.device_put(host)
        reps = repeats if n < 10**8 else max(1, min(repeats, 3))
        jax.block_until_ready(ours(dev))  # compile
        # The temporaries XLA allocates for one call (every branch's, whether it runs or not).
        analysis = ours.lower(dev).compile().memory_analysis()
        temp_mb = analysis.temp_size_in_bytes / 1e6 if analysis is not None else float("nan")
        mask = ours(dev)
        pruned = sum(int((~m).sum()) for m in mask.values())
        total = sum(x.size for x in host.values())
        assert pruned == n_pruned(total), (pruned, total)  # sanity, not a timing
        with_sort = n < 10**8 or args.argsort_1e8
        if with_sort:
            jax.block_until_ready(argsort_baseline(dev))  # compile (and one run)
        times = {"ours": [], "np": [], "sort": []}
        fresh, system = [], []
        for r in range(reps):  # interleaved rounds
            seconds, mb, sys_s = timed(ours, dev, block=True)
            times["ours"].append(seconds)
            fresh.append(mb)
            system.append(sys_s)
            times["np"].append(timed(numpy_partition, host, block=False)[0])
            if with_sort and (n < 10**8 or r == 0):
                times["sort"].append(timed(argsort_baseline, dev, block=True)[0])
        t_ours, t_np = (float(np.median(times[k])) for k in ("ours", "np"))
        if with_sort:
            t_sort = float(np.median(times["sort"]))
            sort_cell, ratio_cell = f"{t_sort:9.3f}s", f"{t_sort / t_ours:13.1f}x"
        else:
            sort_cell, ratio_cell = f"{'skipped':>10}", f"{'-':>14}"
        print(
            f"| {f'1e{len(str(total)) - 1}':>5} | {t_ours:11.3f}s | {sort_cell} | "
            f"{t_np:11.3f}s | {ratio_cell} | {t_ours / t_np:18.2f}x | "
            f"{float(np.median(fresh)):15.0f} | {float(np.median(system)):15.3f} | "
            f"{temp_mb:14.2f} |",
            flush=True,
        )
        del host, dev, mask


if __name__ == "__main__":
    main()
