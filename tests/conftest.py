import gc
import importlib
import os
import pathlib
import sys

# Eight CPU devices for the multi-device tests (test_parallel.py); read when JAX first starts its
# CPU backend, so set before any test runs. Single-device tests use the first one, as before.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import hypothesis
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


# Tests draw their data from a fixed seed, so a tolerance can't flake. JAX_MOE_TEST_SEED=random
# draws a fresh seed per test (printed, to replay a failure with JAX_MOE_TEST_SEED=<seed>).
SEED_VARIABLE = "JAX_MOE_TEST_SEED"
DEFAULT_SEED = 0

# Property tests draw the same examples every run too, unless fresh seeds are asked for.
hypothesis.settings.register_profile("fixed", derandomize=True, database=None)
hypothesis.settings.register_profile("random", derandomize=False)
hypothesis.settings.load_profile("random" if os.environ.get(SEED_VARIABLE) == "random" else "fixed")


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Each test module leaves JAX's compiled programs behind it: the suite's memory is that of
    its largest module, not of every program it ever compiled."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def seed() -> int:
    """The test's data seed: ``DEFAULT_SEED`` unless ``JAX_MOE_TEST_SEED`` says otherwise."""
    setting = os.environ.get(SEED_VARIABLE, "")
    value = int.from_bytes(os.urandom(4), "little") if setting == "random" else int(setting or DEFAULT_SEED)
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
