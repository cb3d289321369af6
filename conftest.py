"""Test-session setup shared by the suite and the doctests.

Eight virtual CPU devices let the sharding tests run on any machine; this must
happen before JAX is first imported, which is why it lives in the root conftest.
The suite checks results, not speed, and most of its time is XLA compiling small
programs: with XLA's optimization passes off it compiles about a third faster.
Benchmarks and experiments run with the optimizations on.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
