"""Test-session set-up: 8 simulated CPU devices, configured before JAX is imported."""

import os

# Must happen before the first `import jax` anywhere in the session: the
# distributed, pmap and sharding tests need 8 devices; the rest use device 0.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
