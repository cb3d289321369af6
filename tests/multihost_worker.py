"""One process of the two-process run of ``tests/test_multihost.py``.

``python tests/multihost_worker.py PROCESS_ID PORT FOLDER``: joins a ``jax.distributed``
run of two processes on localhost (2 CPU devices each, gloo collectives, one 2x2 mesh),
reads the values from ``FOLDER/values.npz``, runs the public functions on global arrays
built from them, and writes what it got to ``FOLDER/process<i>.npz`` (whole arrays,
gathered) and ``FOLDER/process<i>.json`` (shardings kept, error messages).
"""

import json
import os
import sys


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
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import fisher_optax as fo

    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
    rows_cols = NamedSharding(mesh, P("x", "y"))
    with np.load(os.path.join(folder, "values.npz")) as f:
        values = dict(f)

    def spread(prefix, sharding=rows_cols):
        out = {}
        for name, v in values.items():
            if name.startswith(prefix):
                out[name[len(prefix) :]] = jax.make_array_from_callback(
                    v.shape, sharding, lambda i, v=v: v[i]
                )
        return out

    params, fisher, mask = spread("params/"), spread("fisher/"), spread("mask/")
    # The mask laid out differently from params: quantize must align the shards.
    mask = {k: jax.device_put(v, NamedSharding(mesh, P("y", None))) for k, v in mask.items()}
    got, info = {}, {"spans": [], "sharding_kept": [], "errors": {}}

    def record(name, tree):
        for k, v in tree.items():
            info["spans"].append(not v.is_fully_addressable)
            got[f"{name}/{k}"] = multihost_utils.process_allgather(v, tiled=True)

    opt = optax.adam(1e-2)
    state = opt.init(params)
    _, state = opt.update(params, state, params)
    f_state = fo.fisher_from_state(state)
    record("fisher_from_state", f_state)
    record("saliency", fo.scores(params, "saliency", fisher=fisher))
    record("select", fo.select(fo.scores(params, "magnitude"), 0.6))
    record("magnitude_mask", fo.magnitude_mask(params, 0.5))
    record("two_stage_mask", fo.two_stage_mask(params, 0.7, fisher=fisher))
    for axis in (None, -1):
        q = fo.quantize(params, 2, fisher=fisher, mask=mask, axis=axis)
        deq = fo.dequantize(q)
        info["sharding_kept"] += [deq[k].sharding == params[k].sharding for k in params]
        record(f"dequantize_{axis}", deq)
        for k, book in zip(q.paths, q.codebooks, strict=True):
            for width, b in book.items():
                got[f"codebook_{axis}/{k}/{width}"] = b
    path = os.path.join(folder, "model.fq")
    info["bytes"] = fo.save_compressed(path, q)
    info["file_bytes"] = os.path.getsize(path)
    loaded = jax.device_put(fo.dequantize(fo.load_compressed(path)), rows_cols)
    info["sharding_kept"] += [v.sharding == rows_cols for v in loaded.values()]
    record("loaded", loaded)
    for name, call in {
        "allocate_bits": lambda: fo.allocate_bits(params, fisher=fisher, average_bits=2),
        "uniform": lambda: fo.quantize(params, 2, method="uniform"),
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
