"""Two JAX processes on localhost (``jax.distributed``, gloo, 2 CPU devices each, one 2x2
mesh): the masks, Fisher, scores, bit allocation, quantization, the file and its report on
global arrays that span both processes equal the single-process results on the same values.

One subprocess pair runs everything (``tests/multihost_worker.py``); the test process
computes the single-process results.
"""

import importlib
import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import fisher_optax as fo

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
_spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)  # its calls, run here on one process
_spec.loader.exec_module(worker)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package's checkout
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"dense": (8, 12), "conv": (4, 4, 2, 6), "small": (3, 4), "bias": (8,)}
    out = {}
    for name, shape in shapes.items():
        w = rng.normal(size=shape).astype(np.float32)
        if name == "dense":  # repeated values, in shards of both processes, and ties
            w = np.round(w, 1)
        f = (rng.random(shape) ** 4 * (rng.random(shape) > 0.2)).astype(np.float32)
        out[f"params/{name}"] = w
        out[f"fisher/{name}"] = f
        out[f"mask/{name}"] = rng.random(shape) > 0.3
    return out


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax

        return hasattr(_jax, "make_gloo_tcp_collectives")
    except ImportError:
        return False


def _run(folder):
    if not _gloo_available():
        pytest.skip("this jaxlib has no gloo CPU collectives (needed for two processes)")
    values = _values()
    np.savez(folder / "values.npz", **values)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]),
    )
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(i), port, str(folder)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:] if i < len(logs) else ''}"
    out = []
    for i in range(2):
        with np.load(folder / f"process{i}.npz") as f:
            arrays = dict(f)
        with open(folder / f"process{i}.json") as f:
            out.append((arrays, json.load(f)))
    return values, out


def _tree(values, prefix):
    return {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}


def _single_process(values):
    """The results of the worker's calls, on one process, on the same values."""
    params, fisher, mask = (_tree(values, p) for p in ("params/", "fisher/", "mask/"))
    want = {}

    def record(name, tree):
        for k, v in tree.items():
            want[f"{name}/{k}"] = np.asarray(v)

    def record_books(name, q):
        want.update({f"{name}/{k}": b for k, b in worker.books(q).items()})

    _, q, tuned = worker.pipeline(params, fisher, mask, record, record_books)
    record("loaded", fo.dequantize(q))
    want["share_codebooks"] = {k: np.asarray(b) for k, b in worker.books(tuned).items()}
    report = fo.sparsity_report(mask)
    want_report = [report.sparsity, report.pruned, report.prunable]
    return want, fo.save_compressed(os.devnull, q), want_report


def test_two_processes_equal_one_and_refuse_by_message(tmp_path):
    """One pair of processes (each costs a JAX start and its compiles) for every check."""
    values, out = _run(tmp_path)
    _check_equal_to_one_process(values, out)
    _check_refusal_names_the_workaround(out)
    _check_values_spread_over_processes(out)


def _check_equal_to_one_process(values, out):
    want, size, report = _single_process(values)
    tuned = want.pop("share_codebooks")
    covered = {name: np.zeros(w.shape, int) for name, w in want.items()}
    for arrays, info in out:
        assert {key.partition("@")[0] for key in arrays} == set(want)
        for key, got in arrays.items():
            name = key.partition("@")[0]
            place = np.ix_(*info["blocks"][key]) if key in info["blocks"] else ...
            np.testing.assert_array_equal(got, want[name][place], err_msg=key)
            assert got.dtype == want[name].dtype, key
            covered[name][place] += 1
        assert all(info["spans"]), "the worker's results must be global arrays"
        assert all(info["sharding_kept"])
        assert info["bytes"] == info["file_bytes"] == info["report_bytes"] == size
        assert info["sparsity_report"] == report
        assert set(info["share_codebooks"]) == set(tuned)
        for key, book in info["share_codebooks"].items():
            np.testing.assert_allclose(book, tuned[key], rtol=1e-6, atol=1e-7, err_msg=key)
    for name, count in covered.items():  # the blocks of both processes make up the whole
        assert count.min() >= 1, f"{name}: elements that no process holds"


def _check_refusal_names_the_workaround(out):
    for _, info in out:
        message = info["errors"]["allocate_layer"]
        assert "granularity='layer' on arrays that span processes" in message
        assert "granularity='weight'" in message and "process_allgather" in message


def _check_values_spread_over_processes(out):
    """The checks read the shards of both processes: each bad entry lies in the second half
    of axis 0, which the mesh axis ``x`` gives to process 1."""
    for _, info in out:
        errors = info["errors"]
        assert (
            "params at ['dense'] holds 1 non-finite value(s) (first at index (5, 2): nan)"
            in (errors["nan"])
        )
        assert "fisher at ['conv'] holds 1 negative value(s) (min -1.0)" in errors["negative"]
        assert "bits at ['dense'] must be 0 (pruned) or in 1..16, got 17" in errors["bits"]


def test_row_split_into_blocks_clusters_as_the_whole_row_bit_for_bit():
    """The merge that quantize runs on shards, in one process: a row cut into blocks (values
    repeated across the cuts, weights over 16 decades, so that the order of a sum shows)
    gives the float64 centroids of the whole row, each value's weight summed in row order."""
    quantize_module = importlib.import_module("fisher_optax.quantize")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 40, size=(3, 300)) / 8
    w = rng.random((3, 300)) * 10.0 ** rng.integers(-8, 8, size=(3, 300))
    valid = rng.random((3, 300)) > 0.1
    want = fo.kmeans_rows_host(x, 4, weights=w, valid=valid)
    cuts = [slice(0, 70), slice(70, 71), slice(71, 180), slice(180, 300)]
    got = quantize_module._kmeans_across(
        [np.arange(3)] * len(cuts),
        [x[:, c] for c in cuts],
        [valid[:, c] for c in cuts],
        [w[:, c] for c in cuts],
        [True] * len(cuts),
        3,
        4,
        "dp",
        lambda j: np.broadcast_to(np.arange(300)[cuts[j]], (3, cuts[j].stop - cuts[j].start)),
    )
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(np.concatenate(got[2], 1), want[2])
