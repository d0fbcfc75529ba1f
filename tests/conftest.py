"""Strict test configuration: float64 everywhere, no implicit rank promotion; compiled
programs freed after every test module, and kept on disk for the rest of the session;
the slow integration tests first."""

import atexit
import gc
import os
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
# Compiling is most of this suite's time, and most of a compile is XLA's optimizing
# passes and its CPU fusion emitters, which the tests do not need: they check our
# arithmetic, in float64, against closed forms and finite differences, and runs against
# runs made the same way. Without them the whole suite took 8 minutes instead of 20 on
# two cores (docs/getting_started.md). Set in the environment, so that the command-line
# runs and scripts the tests start compile the same way (XLA's FLOP counts, which
# scripts/hvp_cost.py reports, are the same either way). HYPERGRAD_TEST_XLA_OPTIMIZE=1
# runs the suite with XLA's defaults.
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
if os.environ.get("HYPERGRAD_TEST_XLA_OPTIMIZE", "0") != "1":
    # Read when JAX starts its CPU backend, which nothing has done yet (pytest-xdist's
    # workers inherit the flag from the process that starts them).
    _flags = os.environ.get("XLA_FLAGS", "")
    if TEST_XLA_FLAGS not in _flags.split():
        os.environ["XLA_FLAGS"] = f"{_flags} {TEST_XLA_FLAGS}".strip()
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    jax.config.update("jax_disable_most_optimizations", True)

if os.environ.get("HYPERGRAD_TEST_CACHE", "1") != "0":
    # JAX's persistent compilation cache, one folder per test process (each pytest-xdist
    # worker has its own: two processes never write one entry), removed when it exits.
    # Modules compile the same programs again after `_free_compiled_programs`, and tests
    # build the same problems anew; this reads them back instead. Every program is kept,
    # however fast it compiled (about 10 MB per 800). Set only in this process's config,
    # not in the environment, so the command-line runs the tests start (some of them
    # killed with SIGKILL) neither read nor write it (test_resume.py gives the runs of
    # one test a cache of their own).
    _CACHE = tempfile.mkdtemp(prefix="hypergrad-test-jax-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Every XLA:CPU executable keeps memory mappings of its own; the whole suite compiles
    thousands of them in one process, which reached the kernel's ``vm.max_map_count``
    (65 530) and crashed the next compile. Dropping them after each module keeps the
    process far below it."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_collection_modifyitems(config, items):
    """The tests marked ``slow`` (multi-minute integration runs) start first, so that with
    pytest-xdist no worker begins one while the others have finished."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
