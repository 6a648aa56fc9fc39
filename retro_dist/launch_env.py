"""Which launcher started this process, and the rank, world size and local rank it gave: the one reading of
launcher environments, for training (retro_dist.dist) and data_prep (mpi4py ranks, the GPU to embed on).

Launchers and what they set: torchrun / deepspeed (RANK, WORLD_SIZE, LOCAL_RANK); mpirun (OMPI_COMM_WORLD_* for Open
MPI, PMI_RANK / PMI_SIZE for MPICH and Intel MPI); srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; with --mpi=pmix
also PMIX_RANK). No torch import: data_prep uses it before anything heavy is loaded.
"""

from __future__ import annotations

import os
import socket
import subprocess


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for MASTER_PORT on one machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistInitError(ValueError):
    """The process group could not be formed: one line naming the rendezvous and what to check."""


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:  # node[1-4,7] -> node1 without scontrol
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def discover(env: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """The torch-style variables for this process, and the name of the launcher they came from."""
    env = dict(os.environ if env is None else env)
    # The launcher that started this process wins. mpirun inside an sbatch/salloc allocation leaves SLURM_PROCID in
    # place (the batch step's, or that of the srun that started Open MPI's daemons: the same on several ranks), so
    # MPI variables that disagree with SLURM's come from mpirun; where they agree, srun started the process.
    mpi_rank = env.get("OMPI_COMM_WORLD_RANK") or env.get("PMI_RANK")
    mpi_size = env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE")
    slurm = "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env
    srun_started = slurm and (mpi_rank, mpi_size) in ((None, None), (env.get("SLURM_PROCID"), env.get("SLURM_NTASKS")))
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torch"
        mapped = {"RANK": env["RANK"], "WORLD_SIZE": env["WORLD_SIZE"], "LOCAL_RANK": env.get("LOCAL_RANK", "0")}
    elif mpi_rank is not None and not srun_started:
        launcher = "mpi"
        if mpi_size is None:
            raise DistInitError("under MPI but the world size is not in the environment (OMPI_COMM_WORLD_SIZE / "
                               "PMI_SIZE); launch with mpirun -np N")
        mapped = {"RANK": mpi_rank, "WORLD_SIZE": mpi_size,
                  "LOCAL_RANK": env.get("OMPI_COMM_WORLD_LOCAL_RANK") or env.get("MPI_LOCALRANKID", "0")}
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" not in env and slurm and nodelist:  # mpirun in an allocation places rank 0 on its first node
            mapped["MASTER_ADDR"] = _first_slurm_host(nodelist)
    elif slurm:
        launcher = "slurm"
        mapped = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
                  "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
        if "MASTER_ADDR" not in env:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise DistInitError("under SLURM but SLURM_JOB_NODELIST is not set: cannot find the rendezvous host")
            mapped["MASTER_ADDR"] = _first_slurm_host(nodelist)
        if "MASTER_PORT" not in env:
            mapped["MASTER_PORT"] = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    elif "PMIX_RANK" in env:
        raise DistInitError("under PMIx (PMIX_RANK) but no world size in the environment: launch with mpirun -np N, "
                           "srun, or torchrun")
    else:
        launcher = "single"
        mapped = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        if "MASTER_PORT" not in env:
            mapped["MASTER_PORT"] = str(free_port())
    if int(mapped["WORLD_SIZE"]) > 1 and "MASTER_ADDR" not in env and "MASTER_ADDR" not in mapped:
        raise DistInitError(f"{int(mapped['WORLD_SIZE'])} ranks from the {launcher} launcher but no MASTER_ADDR: set "
                           f"MASTER_ADDR (the first host) and MASTER_PORT, or use a launch/ script")
    mapped.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", "127.0.0.1"))
    mapped.setdefault("MASTER_PORT", env.get("MASTER_PORT", "29500"))
    return mapped, launcher


def local_rank(env: dict[str, str] | None = None) -> int:
    """This process's rank on its node, from whichever launcher started it (0 for a lone process)."""
    try:
        return int(discover(env)[0]["LOCAL_RANK"])
    except DistInitError:  # a rank without a rendezvous (mpirun for data_prep): its local rank is still known
        env = dict(os.environ if env is None else env)
        return int(env.get("OMPI_COMM_WORLD_LOCAL_RANK") or env.get("MPI_LOCALRANKID") or env.get("SLURM_LOCALID")
                   or env.get("LOCAL_RANK") or 0)


def launched_by_mpi(env: dict[str, str] | None = None) -> bool:
    """Whether this process is one of several ranks of an MPI job that mpi4py can join: started by mpirun, or by srun
    with a PMI/PMIx plugin (plain srun gives SLURM_* variables, but no PMI to join them into one MPI world)."""
    env = dict(os.environ if env is None else env)
    sizes = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
    if any(int(env.get(v, "1")) > 1 for v in sizes):
        return True
    return (int(env.get("SLURM_NTASKS", "1")) > 1 and "PMI_FD" in env) or "PMIX_RANK" in env
