"""Fixtures of the distributed tests: one local Ray cluster of this machine's 2 cores per module."""

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray.init(num_cpus=2)` for the module's tests, shut down after them."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()
