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


@pytest.fixture
def fail_next_step():
    """A function for a worker's `call`: the worker engine's next step raises, once; the process lives on.
    (Defined inside the fixture, so Ray pickles it by value.)"""
    def inject(engine):
        step = engine.step

        def failing():
            engine.step = step
            raise RuntimeError("injected step failure")

        engine.step = failing

    return inject
