"""Test configuration: CPU, float32 matmuls at full precision, rank promotion raises, and JAX's
persistent compilation cache in a temporary directory shared by the whole test session.

The cache matters because many tests build the same programs again (a new model object, a new
training-step closure, a subprocess): identical programs then load from disk instead of being
compiled by XLA again. It lives in a fresh temporary directory per session (and is passed to
subprocesses through the environment), so nothing from an earlier run or another checkout can
leak into a test. `G2IS_TEST_CACHE=0` turns it off.
"""

import os
import shutil
import tempfile

# Simulated CPU devices for sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = None
if os.environ.get("G2IS_TEST_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="g2is-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    # Cache every program, however quick to compile or small (tests compile many small ones).
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session, exitstatus):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)
