"""Run every benchmarks/bench_*.py in turn (`make bench`); each prints its own ratio table.

Extra arguments are passed to every script (e.g. `--quick`).
"""

import pathlib
import subprocess
import sys

here = pathlib.Path(__file__).parent
failed = []
for script in sorted(here.glob("bench_*.py")):
    print(f"\n=== {script.name}", flush=True)
    if subprocess.run([sys.executable, str(script), *sys.argv[1:]], check=False).returncode:
        failed.append(script.name)
if failed:
    sys.exit(f"benchmarks failed: {', '.join(failed)}")
