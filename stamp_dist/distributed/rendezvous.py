"""The Ray Train workers' process group, bound to loopback when the run is local.

Ray Train's own setup (``TorchConfig``, ``init_method="env"``) lets rank 0's torch ``TCPStore`` listen
on every interface (``*:PORT``, IPv6 ``::``) even when Ray itself runs on 127.0.0.1: torch has no
option for the address the store binds. It does take an already listening socket
(``master_listen_fd``), so for a local run ``LoopbackTorchConfig`` has rank 0 bind one to 127.0.0.1,
serve the store on it, and every rank joins as a client; gloo's own connections are bound to the
loopback interface through ``GLOO_SOCKET_IFNAME`` (``launch.worker_env``). A multi-node run keeps
Ray Train's setup (its workers must reach rank 0 over the network).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"
_served: list = []  # rank 0's listening socket and store server, alive as long as its process


def _serve_store(world_size: int, timeout_s: int) -> int:
    """On rank 0: a TCPStore server on a socket bound to 127.0.0.1; returns its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    store = dist.TCPStore(LOOPBACK, sock.getsockname()[1], world_size, is_master=True,
                          timeout=timedelta(seconds=timeout_s), wait_for_workers=False, master_listen_fd=sock.fileno())
    _served[:] = [sock, store]
    return sock.getsockname()[1]


def _join(backend: str, rank: int, world_size: int, port: int, timeout_s: int) -> None:
    """On every rank: join the process group through the store on 127.0.0.1:``port``."""
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port))  # what DeepSpeed reads, as with env://
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(LOOPBACK, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class _LoopbackBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "LoopbackTorchConfig"):
        import ray

        n, timeout = len(worker_group), backend_config.timeout_s
        port = worker_group.execute_single(0, _serve_store, n, timeout)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, _join, backend_config.backend, rank, n, port, timeout)
                 for rank in range(n)])


class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` for a run on this machine only: nothing listens beyond 127.0.0.1."""

    @property
    def backend_cls(self):
        return _LoopbackBackend
