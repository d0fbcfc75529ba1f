"""Strict test configuration: float64 everywhere, no implicit rank promotion; compiled
programs freed after every test module."""

import gc

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Every XLA:CPU executable keeps memory mappings of its own; the whole suite compiles
    thousands of them in one process, which reached the kernel's ``vm.max_map_count``
    (65 530) and crashed the next compile. Dropping them after each module keeps the
    process far below it."""
    yield
    jax.clear_caches()
    gc.collect()
