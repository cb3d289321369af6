"""Test-session setup shared by the suite and the doctests.

Eight virtual CPU devices let the sharding tests run on any machine; this must
happen before JAX is first imported, which is why it lives in the root conftest.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
