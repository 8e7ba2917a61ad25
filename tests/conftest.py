"""Test set-up shared by the suite: 8 fake CPU devices for mesh/sharding tests.

XLA reads the flag once, when the backend starts, so it is set here before anything imports jax.
"""
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
