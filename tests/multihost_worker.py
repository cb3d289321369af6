"""One process of the two-process run of ``tests/test_multihost.py``.

``python tests/multihost_worker.py PROCESS_ID PORT FOLDER``: joins a ``jax.distributed``
run of two processes on localhost (2 CPU devices each, gloo collectives, one 2x2 mesh),
reads the values from ``FOLDER/values.npz``, runs the public functions on global arrays
built from them, and writes what it got to ``FOLDER/process<i>.npz`` (what it holds
of each result) and ``FOLDER/process<i>.json`` (shardings kept, error messages).
"""

import json
import os
import sys


def books(q) -> dict:
    """The codebooks of a QuantizedParams by ``path/width``."""
    return {
        f"{k}/{width}": b
        for k, book in zip(q.paths, q.codebooks, strict=True)
        for width, b in book.items()
    }


def pipeline(params, fisher, mask, record, record_books, check=lambda deq: None):
    """The calls compared across processes, in order, on the worker's global arrays and on
    the test's single-process ones: ``record(name, tree)`` and ``record_books(name, q)``
    take the results, ``check`` each dequantized tree. Returns ``(bits, q, tuned)``: the
    allocated widths, the quantized params that are saved, and their codebooks after one
    jitted step of ``share_codebooks`` (whose gradient sums per entry run in the order of
    the shards: equal across processes up to float rounding)."""
    import jax
    import optax

    import fisher_optax as fo

    opt = optax.adam(1e-2)
    _, state = opt.update(params, opt.init(params), params)
    record("fisher_from_state", fo.fisher_from_state(state))
    record("saliency", fo.scores(params, "saliency", fisher=fisher))
    record("select", fo.select(fo.scores(params, "magnitude"), 0.6))
    record("magnitude_mask", fo.magnitude_mask(params, 0.5))
    record("two_stage_mask", fo.two_stage_mask(params, 0.7, fisher=fisher))
    bits = fo.allocate_bits(params, fisher=fisher, mask=mask, average_bits=3, scope="layer")
    record("allocate_bits", bits)
    runs = {
        "kmeans_None": dict(bits=2, fisher=fisher, mask=mask),
        "kmeans_-1": dict(bits=2, fisher=fisher, mask=mask, axis=-1),
        "bits_tree": dict(bits=bits, fisher=fisher),
        "uniform": dict(bits=3, mask=mask, axis=-1, method="uniform"),
    }
    for name, kwargs in runs.items():
        q = fo.quantize(params, **kwargs)
        deq = fo.dequantize(q)
        check(deq)
        record(f"dequantize_{name}", deq)
        record_books(f"codebook_{name}", q)
    q = fo.quantize(params, 2, fisher=fisher, mask=mask, axis=-1)
    trained = jax.tree.map(lambda x: x * 2, fo.dequantize(q))  # every entry doubled
    record_books("requantize", fo.requantize(trained, q))
    tx = fo.share_codebooks(optax.sgd(0.1), q)
    deq = fo.dequantize(q)
    updates, _ = jax.jit(tx.update)(deq, tx.init(deq), deq)
    tuned = fo.requantize(optax.apply_updates(deq, updates), q)
    return bits, q, tuned


def main(process_id: int, port: int, folder: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import fisher_optax as fo

    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
    rows_cols = NamedSharding(mesh, P("x", "y"))
    with np.load(os.path.join(folder, "values.npz")) as f:
        values = dict(f)

    def spread(prefix):
        out = {}
        for name, v in values.items():
            if name.startswith(prefix) and not name.endswith("/small"):
                layout = rows_cols if v.ndim > 1 else NamedSharding(mesh, P(("x", "y")))
                out[name[len(prefix) :]] = jax.make_array_from_callback(
                    v.shape, layout, lambda i, v=v: v[i]
                )
        return out

    params, fisher, mask = spread("params/"), spread("fisher/"), spread("mask/")
    # A leaf every process holds whole (NumPy) among the global ones.
    for tree, prefix in ((params, "params/"), (fisher, "fisher/"), (mask, "mask/")):
        tree["small"] = values[prefix + "small"]
    # Masks laid out otherwise than params (another sharding, NumPy held whole by every
    # process): quantize must align them with the shards.
    mask["dense"] = jax.device_put(mask["dense"], NamedSharding(mesh, P("y", None)))
    mask["conv"] = values["mask/conv"]
    got, info = {}, {"spans": [], "sharding_kept": [], "errors": {}, "blocks": {}}

    def record(name, tree):
        """Arrays every process holds whole as they are; global ones as the blocks this
        process holds (``name@j``, with their place in ``info["blocks"]``): no collective."""
        for k, v in tree.items():
            if k == "small":
                got[f"{name}/{k}"] = np.asarray(v)
                continue
            info["spans"].append(not v.is_fully_addressable)
            for j, shard in enumerate(v.addressable_shards):
                got[f"{name}/{k}@{j}"] = np.asarray(shard.data)
                info["blocks"][f"{name}/{k}@{j}"] = [
                    list(range(n))[i] for i, n in zip(shard.index, v.shape, strict=True)
                ]

    def record_books(name, q):
        got.update({f"{name}/{k}": b for k, b in books(q).items()})

    def kept_sharding(deq):
        info["sharding_kept"] += [
            deq[k].sharding == params[k].sharding for k in deq if k != "small"
        ]

    bits, q, tuned = pipeline(params, fisher, mask, record, record_books, kept_sharding)
    info["share_codebooks"] = {k: np.asarray(b).tolist() for k, b in books(tuned).items()}
    report = fo.sparsity_report(mask)
    info["sparsity_report"] = [report.sparsity, report.pruned, report.prunable]
    path = os.path.join(folder, "model.fq")
    info["bytes"] = fo.save_compressed(path, q)
    info["file_bytes"] = os.path.getsize(path)
    info["report_bytes"] = fo.compression_report(q).total_bytes
    layout = {k: v.sharding for k, v in params.items() if k != "small"}
    loaded = fo.dequantize(fo.load_compressed(path))
    loaded = {k: jax.device_put(v, layout.get(k)) for k, v in loaded.items()}
    info["sharding_kept"] += [loaded[k].sharding == s for k, s in layout.items()]
    record("loaded", loaded)
    for name, call in {
        "allocate_layer": lambda: fo.allocate_bits(
            params, fisher=fisher, average_bits=2, granularity="layer"
        ),
        "nan": lambda: fo.quantize(dict(params, dense=params["dense"].at[5, 2].set(np.nan)), 2),
        "negative": lambda: fo.quantize(
            params, 2, fisher=dict(fisher, conv=fisher["conv"].at[3, 1, 0, 3].set(-1.0))
        ),
        "bits": lambda: fo.quantize(params, dict(bits, dense=bits["dense"].at[6, 0].set(17))),
    }.items():
        try:
            call()
        except ValueError as e:
            info["errors"][name] = str(e)
    np.savez(os.path.join(folder, f"process{process_id}.npz"), **got)
    with open(os.path.join(folder, f"process{process_id}.json"), "w") as f:
        json.dump(info, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
