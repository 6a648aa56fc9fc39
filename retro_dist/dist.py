"""Rank discovery and process-group setup for every launcher: deepspeed/torchrun, SLURM's srun, mpirun.

One function, `init_distributed`, reads whichever launcher environment it finds (retro_dist.launch_env, shared with
data_prep), maps it onto RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (the names torch and DeepSpeed
read), and initialises the process group with
the backend of the device (nccl on GPU, gloo on CPU) and a timeout, so that a dead rank fails the others instead of
hanging them. Under SLURM it never lets every task believe it is rank 0 of 1 (DeepSpeed never reads SLURM_*).

A single-node run (MASTER_ADDR on loopback) keeps its rendezvous off the network: torch's TCPStore server listens
on every interface whatever host it is given, so rank 0 binds the listening socket to loopback itself and hands it
to the store. Under torchrun the agent hosts the store (on every interface; torchrun offers no bind address).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass

import torch

from retro_dist.launch_env import DistInitError, discover, free_port

__all__ = ["DistInfo", "DistInitError", "cuda_device", "discover", "free_port", "init_distributed"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str


def loopback_host(addr: str) -> str | None:
    """The address to bind the rendezvous to when MASTER_ADDR names this machine's loopback, else None."""
    if addr == "localhost":
        return "127.0.0.1"
    try:
        return addr if ipaddress.ip_address(addr).is_loopback else None
    except ValueError:  # a host name: another node may be connecting to it
        return None


def _loopback_store(mapped: dict[str, str], timeout: datetime.timedelta):
    """Rank 0's TCPStore on a socket bound to loopback, or None where rank 0 does not host the store on loopback."""
    host = loopback_host(mapped["MASTER_ADDR"])
    if host is None or mapped["RANK"] != "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's own server socket
        sock.bind((host, int(mapped["MASTER_PORT"])))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    store = torch.distributed.TCPStore(host, int(mapped["MASTER_PORT"]), int(mapped["WORLD_SIZE"]), is_master=True,
                                       timeout=timeout, master_listen_fd=sock.detach())
    # the prefix torch adds to the store of an env:// rendezvous (what the other ranks use), not to a given store
    return torch.distributed.PrefixStore("default_pg", store)


def cuda_device(local_rank: int, visible: int, launcher: str, env: dict[str, str] | None = None) -> torch.device:
    """The GPU of this rank: cuda:LOCAL_RANK, or cuda:0 where srun binds one GPU to each task (--gpus-per-task=1,
    --gpu-bind), which leaves each task seeing one device. More ranks on a node than GPUs is one line."""
    env = os.environ if env is None else env
    if local_rank < visible:
        return torch.device("cuda", local_rank)
    if visible == 1 and launcher == "slurm":
        return torch.device("cuda", 0)
    shown = env.get("CUDA_VISIBLE_DEVICES")
    raise DistInitError(f"local rank {local_rank} needs GPU {local_rank} but this process sees {visible} GPU(s)"
                       f"{f' (CUDA_VISIBLE_DEVICES={shown})' if shown is not None else ''}: start at most {visible} "
                       f"rank(s) per node (NPROC / --nproc / --ntasks-per-node), or bind one GPU per task with srun "
                       f"--gpus-per-task=1")


def init_distributed(timeout_s: int = 300) -> DistInfo:
    mapped, launcher = discover()
    os.environ.update(mapped)
    local_rank = int(mapped["LOCAL_RANK"])
    if torch.cuda.is_available():
        device, backend = cuda_device(local_rank, torch.cuda.device_count(), launcher), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    import deepspeed  # the trainer's dependency, not the model's
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = _loopback_store(mapped, timeout)
        if store is not None:  # DeepSpeed takes no store: form the group here, DeepSpeed then adopts it
            world = int(mapped["WORLD_SIZE"])
            torch.distributed.init_process_group(backend, store=store, rank=0, world_size=world, timeout=timeout,
                                                 **({"device_id": device} if backend == "nccl" and world > 1 else {}))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
                                   distributed_port=int(mapped["MASTER_PORT"]))
    except Exception as e:  # noqa: BLE001 - torch raises several types here (DistNetworkError, RuntimeError, ...)
        detail = " ".join(str(e).split())[:200]
        raise DistInitError(f"rank {mapped['RANK']} of {mapped['WORLD_SIZE']} ({launcher} launcher) could not join the "
                           f"process group at {mapped['MASTER_ADDR']}:{mapped['MASTER_PORT']} within {timeout_s}s: "
                           f"check that MASTER_ADDR is the first host and reachable, and the port is free "
                           f"({type(e).__name__}: {detail})") from None
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device, backend,
                    launcher)
