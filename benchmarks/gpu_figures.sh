#!/usr/bin/env bash
# The GPU figures in one run that fits a short lease: selection at 1e8 and 1e9 scores,
# the pruned step, the fast Fisher, compile time against the leaf count. Nothing in
# `make test` or CI runs this.
#
# The package imports constriction, which a GPU image may lack; carry its wheel (Python 3.12
# there), from the repository's root, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl constriction==0.5.0
# then run `bash benchmarks/gpu_figures.sh` there with `.whl` carried. Each table is printed
# and, where $OUT is set, written to $OUT/<bench>.txt. Tested on the CPU with GPU_FIGURES_QUICK=1.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
out=${OUT:-/tmp/gpu_figures}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$out/device.txt"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/device.txt"

if [ "${GPU_FIGURES_QUICK:-0}" = 1 ]; then
    select_args=(--sizes 1e5,1e6 --repeats 3 --argsort-1e8); step_args=(--quick); fisher_args=(--quick)
    compile_args=(--leaves 16 --repeats 1)
else
    select_args=(--sizes 1e6,1e7,1e8,1e9 --repeats 5 --argsort-1e8); step_args=(--steps 100); fisher_args=()
    compile_args=(--leaves 16 64 256 --repeats 3)
fi
status=0
run() {  # name, time limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" || status=1
}
run bench_select 240 "$PY" benchmarks/bench_select.py "${select_args[@]}"
run bench_step 120 "$PY" benchmarks/bench_step.py "${step_args[@]}"
run bench_fisher_fast 120 "$PY" benchmarks/bench_fisher_fast.py "${fisher_args[@]}"
run bench_compile 240 "$PY" benchmarks/bench_compile.py "${compile_args[@]}"
exit $status
