"""Worker handles: an `EngineWorker` in a Ray actor or in a local process, called through futures.

Both kinds answer `submit(method, *args)` with a `concurrent.futures.Future`, run calls one at a time
in submission order, and can be killed (fault tests) and restarted with the same arguments.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
from typing import Any, Callable

from ember.distributed.ray_env import init_ray
from ember.distributed.worker import EngineWorker


def remote_error(exc: BaseException) -> BaseException:
    """The worker's own exception: Ray wraps it (a RayTaskError whose `cause` it is), a process pool does not."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def abandon(handle, request_ids: list[str]) -> None:
    """Abort `request_ids` on a worker whose call failed and whose requests the front end has placed again
    or failed. A Ray actor whose step raised is still alive (Ray restarts only a dead one): its engine would
    keep those requests, holding their KV blocks and running them beside later work. A dead worker has
    nothing to abort; the call's failure is ignored."""
    if not request_ids:
        return
    try:
        handle.submit("abort_request", list(request_ids))
    except Exception:  # a broken process pool refuses the call at once
        pass


class RayWorkerHandle:
    """An `EngineWorker` Ray actor; Ray restarts it (the same constructor call) up to `max_restarts` times.

    Args:
        name: for logs and metrics labels.
        num_cpus: the actor's CPU reservation (also its OMP_NUM_THREADS).
        resources: extra Ray resources, e.g. a node's custom resource to pin a worker to one machine.
    """

    def __init__(self, name: str, build: Callable, args: tuple, num_cpus: float = 1, max_restarts: int = 3,
                 resources: dict | None = None, worker_class: type = EngineWorker,
                 scheduling_strategy: Any = None) -> None:
        ray = init_ray()
        self.name = name
        self.pid: int | None = None
        self._ray = ray
        actor_class = ray.remote(worker_class)
        self.actor = actor_class.options(num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=0,
                                         resources=resources or {},
                                         scheduling_strategy=scheduling_strategy).remote(build, *args)

    def submit(self, method: str, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        return getattr(self.actor, method).remote(*args, **kwargs).future()

    def kill(self) -> None:
        """Kill the actor's process as a crash would (Ray restarts it if restarts are left)."""
        self._ray.kill(self.actor, no_restart=False)

    def restart(self) -> bool:
        """Ray restarts actors itself; nothing to do here. Returns whether a restart is underway."""
        return True

    def shutdown(self) -> None:
        self._ray.kill(self.actor, no_restart=True)


# The worker process's engine (a process-pool task runs in a fresh call stack, so it lives at module
# level of the child process only; the parent never sets it).
_PROCESS_WORKER: EngineWorker | None = None


def _start_process_worker(worker_class: type, build: Callable, args: tuple, num_threads: int) -> None:
    global _PROCESS_WORKER
    os.environ["OMP_NUM_THREADS"] = str(num_threads)
    _PROCESS_WORKER = worker_class(build, *args)


def _call_process_worker(method: str, args: tuple, kwargs: dict) -> Any:
    return getattr(_PROCESS_WORKER, method)(*args, **kwargs)


class ProcessWorkerHandle:
    """An `EngineWorker` in one local process (`spawn`), for single-machine use without Ray.

    A dead process fails its futures with BrokenProcessPool; `restart` starts a new one.
    """

    def __init__(self, name: str, build: Callable, args: tuple, num_cpus: float = 1, max_restarts: int = 3,
                 resources: dict | None = None, worker_class: type = EngineWorker,
                 scheduling_strategy: Any = None) -> None:
        if resources or scheduling_strategy is not None:
            raise ValueError("worker resources and placement need the ray executor")
        self.name = name
        self._spec = (worker_class, build, args, max(1, int(num_cpus)))
        self.restarts_left = max_restarts
        self.pid: int | None = None
        self._pool = self._new_pool()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_process_worker, initargs=self._spec)

    def submit(self, method: str, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        return self._pool.submit(_call_process_worker, method, args, kwargs)

    def kill(self) -> None:
        """SIGKILL the worker process (its pid comes from the worker's `describe`, set by the front end)."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)

    def restart(self) -> bool:
        """Start a fresh process (the dead one's pool is dropped); False once the restarts are used up."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.restarts_left <= 0:
            return False
        self.restarts_left -= 1
        self.pid = None
        self._pool = self._new_pool()
        return True

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def create_worker(backend: str, name: str, build: Callable, args: tuple, num_cpus: float = 1,
                  max_restarts: int = 3, resources: dict | None = None, worker_class: type = EngineWorker,
                  scheduling_strategy: Any = None):
    """A worker handle of the given executor backend ("ray" or "mp"), running `worker_class(build, *args)`
    (an `EngineWorker` or a subclass with more remote methods); `scheduling_strategy` is Ray's (e.g. a
    placement-group bundle, see `RankPlacement`)."""
    handle_class = RayWorkerHandle if backend == "ray" else ProcessWorkerHandle
    return handle_class(name, build, args, num_cpus, max_restarts, resources, worker_class, scheduling_strategy)


class RankPlacement:
    """One Ray placement group with a {"CPU": 1} bundle per rank (`strategy` "STRICT_PACK": all on one
    machine, as tensor parallel wants; "PACK"/"SPREAD" for pipeline stages), or nothing for the mp backend.
    `strategies[i]` is rank i's scheduling strategy; `remove` gives the CPUs back.

    Raises:
        RuntimeError: the cluster cannot hold the group within `timeout_s`.
    """

    def __init__(self, backend: str, num_ranks: int, strategy: str, timeout_s: float) -> None:
        self.group = None
        self.strategies: list = [None] * num_ranks
        if backend != "ray":
            return
        init_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.group = placement_group([{"CPU": 1}] * num_ranks, strategy=strategy)
        if not self.group.wait(timeout_s):
            self.remove()
            raise RuntimeError(f"the Ray cluster cannot place {num_ranks} ranks ({strategy}, one CPU each)")
        self.strategies = [PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i)
                           for i in range(num_ranks)]

    def remove(self) -> None:
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None
