"""The compression pipeline on global arrays spread over two JAX processes against one
process holding the same 2x2 mesh: eager mask, k-means quantization and the file.

Two processes on localhost (``jax.distributed``, gloo collectives, 2 CPU devices each)
and one process with 4 CPU devices run the same calls on the same values; the files they
write are checked to be identical, byte for byte, and each call's median time is printed
with the ratio two processes / one. All processes share this machine's cores, so the
ratio is about the summaries exchanged and the work repeated per process, not about a
real interconnect.

    python benchmarks/bench_multihost.py            # 4 kernels of 1024x1024
    python benchmarks/bench_multihost.py --quick    # 4 kernels of 256x256
"""

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

TIMEOUT_S = 600


def worker(mode: str, process_id: int, port: int, folder: str, repeats: int) -> None:
    import jax

    if mode == "two":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=2,
            process_id=process_id,
            initialization_timeout=60,
        )
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import fisher_optax as fo

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("x", "y"))
    layout = NamedSharding(mesh, P("x", "y"))
    with np.load(os.path.join(folder, "values.npz")) as f:
        values = dict(f)

    def spread(prefix):
        return {
            k[len(prefix) :]: jax.make_array_from_callback(v.shape, layout, lambda i, v=v: v[i])
            for k, v in values.items()
            if k.startswith(prefix)
        }

    params, fisher = spread("params/"), spread("fisher/")
    path = os.path.join(folder, f"{mode}.fq")
    calls = {
        "magnitude_mask (eager, 90%)": lambda: fo.magnitude_mask(params, 0.9),
        "quantize (k-means, 4 bits, Fisher-weighted)": lambda: fo.quantize(
            params, 4, fisher=fisher, mask=mask
        ),
        "save_compressed": lambda: fo.save_compressed(path, q),
    }
    mask = fo.magnitude_mask(params, 0.9)
    q = fo.quantize(params, 4, fisher=fisher, mask=mask)
    times = {}
    for name, call in calls.items():
        jax.block_until_ready(call())  # warm: compiles
        runs = []
        for _ in range(repeats):
            if mode == "two":
                multihost_utils.sync_global_devices(name)
            start = time.perf_counter()
            jax.block_until_ready(call())
            runs.append(time.perf_counter() - start)
        times[name] = float(np.median(runs))
    if process_id == 0:
        with open(os.path.join(folder, f"{mode}.json"), "w") as f:
            json.dump(times, f)


def launch(mode, folder, repeats):
    n = 2 if mode == "two" else 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // n}"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", mode, str(i), str(port), folder, str(repeats)],
            env=env,
        )
        for i in range(n)
    ]
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
    if any(codes):
        sys.exit(f"the {mode}-process run failed: exit codes {codes}")
    with open(os.path.join(folder, f"{mode}.json")) as f:
        return json.load(f)


def main() -> None:
    import jax
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    side = 256 if args.quick else 1024
    rng = np.random.default_rng(0)
    values = {}
    for i in range(4):
        values[f"params/k{i}"] = rng.standard_normal((side, side)).astype(np.float32)
        values[f"fisher/k{i}"] = (rng.random((side, side)) ** 4).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        np.savez(os.path.join(folder, "values.npz"), **values)
        one = launch("one", folder, args.repeats)
        two = launch("two", folder, args.repeats)
        same = (
            pathlib.Path(folder, "one.fq").read_bytes()
            == pathlib.Path(folder, "two.fq").read_bytes()
        )
    if not same:
        sys.exit("the two-process file differs from the one-process file")
    print(
        f"# 4 kernels of {side}x{side} on a 2x2 mesh of host CPU devices, jax {jax.__version__}, "
        f"medians of {args.repeats} calls; the two files are identical"
    )
    print("| call | one process (4 devices) ms | two processes (2 devices each) ms | two / one |")
    print("|---|---|---|---|")
    for name, t1 in one.items():
        t2 = two[name]
        print(f"| {name} | {1e3 * t1:.1f} | {1e3 * t2:.1f} | {t2 / t1:.2f}x |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, pid, port, folder, repeats = sys.argv[2:7]
        worker(mode, int(pid), int(port), folder, int(repeats))
    else:
        main()
