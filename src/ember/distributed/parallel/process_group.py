"""One rank's gloo process group over TCP: how ranks find each other, and the few collectives and
point-to-point transfers tensor and pipeline parallel need.

The group is built from its parts (a `TCPStore` and a `ProcessGroupGloo`) rather than through
`torch.distributed.init_process_group`, so no process-wide default group exists and several groups
can live in one process (the unit tests run two ranks as two threads).
"""

from __future__ import annotations

import pickle
import socket
import sys
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

LOOPBACK = "127.0.0.1"


def node_ip() -> str:
    """This process's address as the cluster sees it: the Ray node's IP inside a Ray worker, else loopback
    (the mp backend keeps every rank on this machine)."""
    ray = sys.modules.get("ray")  # never imported here just to ask
    if ray is not None and ray.is_initialized():
        return ray.util.get_node_ip_address()
    return LOOPBACK


def free_address() -> tuple[str, int]:
    """(this node's IP, a TCP port free on it now) for rank 0's rendezvous store.

    The port is released before the store binds it, so another process could take it in between; the
    store then fails to bind and the engine fails to start with that error (vLLM accepts the same race).
    """
    ip = node_ip()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((ip, 0))
        return ip, sock.getsockname()[1]


class GroupCoordinator:
    """One rank's handle on a process group (vLLM's name): rank, size and the operations on tensors.

    Every rank must call the collectives in the same order with tensors of the same shapes; a rank
    that stops answering makes the others fail after the group's timeout.

    Args:
        group: a gloo process group (backend object) this rank belongs to.
        rank: this rank in the group.
        world_size: ranks in the group.
    """

    def __init__(self, group, rank: int, world_size: int) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns `x`."""
        self.group.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x` (same shape and dtype on all ranks), in rank order."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self.group.allgather([parts], [x]).wait()
        return parts

    def isend(self, x: torch.Tensor, dst: int, tag: int = 0):
        """Start sending `x` to rank `dst`; returns the work to `wait()` on (keep `x` alive until then)."""
        return self.group.send([x.contiguous()], dst, tag)

    def irecv(self, buffer: torch.Tensor, src: int, tag: int = 0):
        """Start receiving into `buffer` (the sender's shape and dtype) from rank `src`; returns the work."""
        return self.group.recv([buffer], src, tag)

    def broadcast_object(self, obj, src: int):
        """`obj` of rank `src` on every rank (pickled: two broadcasts, its length then its bytes)."""
        if self.rank == src:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self.group.broadcast(size, src).wait()
        if self.rank != src:
            data = torch.empty(int(size), dtype=torch.uint8)
        self.group.broadcast(data, src).wait()
        return obj if self.rank == src else pickle.loads(data.numpy().tobytes())


def create_gloo_group(init_method: str, rank: int, world_size: int, timeout_s: float,
                      local_ip: str | None = None) -> GroupCoordinator:
    """Join the group that rank 0 hosts at `init_method` ("tcp://ip:port"); blocks until every rank joined.

    Args:
        local_ip: the address this rank's gloo connections use (default: `node_ip()`).
        timeout_s: how long to wait for the other ranks, at start and in every operation after.
    Raises:
        ValueError: `init_method` is not tcp://host:port.
        RuntimeError (from torch): the other ranks did not join within the timeout.
    """
    url = urlparse(init_method)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"init_method must be tcp://host:port, got {init_method!r}")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(url.hostname, url.port, world_size, rank == 0, timeout=timeout)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_ip or node_ip())]
    options._timeout = timeout
    group = dist.ProcessGroupGloo(dist.PrefixStore("ember", store), rank, world_size, options)
    return GroupCoordinator(group, rank, world_size)
