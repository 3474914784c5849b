"""Ray, imported on demand: an optional dependency (`pip install -e ".[distributed]"`)."""

from __future__ import annotations

import os


def import_ray():
    """The `ray` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError('the ray executor needs Ray: pip install -e ".[distributed]" (make setup installs it), '
                          "or use --distributed-executor-backend mp") from None
    return ray


def init_ray(num_cpus: int | None = None):
    """Join the cluster in RAY_ADDRESS, or start a local one with this machine's cores; once per process.

    The dashboard stays off (it is a web server of its own) and workers' logs go to the driver.
    """
    ray = import_ray()
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], configure_logging=False)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, configure_logging=False)
    return ray
