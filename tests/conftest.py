import importlib
import os
import pathlib
import sys

# Eight CPU devices for the multi-device tests (test_parallel.py); read when JAX first starts its
# CPU backend, so set before any test runs. Single-device tests use the first one, as before.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import numpy as np
import pytest

from jax_moe import backend_triton


def pytest_collection_modifyitems(config, items):
    reason = backend_triton.unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"GPU test: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed() -> int:
    """Fresh every run, printed so that a failure can be replayed."""
    value = int.from_bytes(os.urandom(4), "little")
    print(f"seed = {value}")
    return value


@pytest.fixture
def key(seed) -> jax.Array:
    return jax.random.key(seed)


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def benchmark_module():
    """Imports a script of ``benchmarks/`` by name (they import each other as top-level modules)."""
    path = str(pathlib.Path(__file__).parents[1] / "benchmarks")
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module
