"""A real SLURM cluster on this machine for tests: munge, slurmctld and two slurmd nodes (node1, node2) on
loopback, started by hand (no systemd) and torn down in about a second. Configuration: two slurmd on 127.0.0.1 with
per-node spool dirs, proctrack/linuxproc, task/none, cons_tres, no accounting, MinJobAge=4 (else sbatch --wait
polls every 8-32 s), and timeouts with room for a loaded 2-core machine (a batch script's start 120 s, a message
60 s, a killed process 180 s, a silent slurmd 600 s; the defaults are 10, 10, 60 and 300 s)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

SLURM_CONF = """\
ClusterName=retrotest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort=17001
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool/%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd-%n.log
TmpFS={state}/tmp/%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=4
KillWait=5
BatchStartTimeout=120
MessageTimeout=60
UnkillableStepTimeout=180
SlurmdTimeout=600
InactiveLimit=0
JobRequeue=1
SchedulerType=sched/backfill
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def available() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol"))


class Timeline:
    """A job's state, pending reason and start time, and the nodes' states, kept each time they change."""

    def __init__(self, env: dict[str, str], job: str):
        self.env, self.job, self.start = env, job, time.monotonic()
        self.entries: list[str] = []
        self.last = ""

    def look(self) -> str:
        """The job's state now ("" once it has left the queue), kept with the rest when anything changed."""
        job = subprocess.run(["squeue", "-h", "-j", self.job, "-o", "%T %r start=%S"], env=self.env,
                             capture_output=True, text=True).stdout.strip()
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N:%T"], env=self.env, capture_output=True,
                               text=True).stdout.split()
        entry = f"job {self.job} {job or 'gone'}; {' '.join(nodes)}"
        if entry != self.last:
            self.entries.append(f"{time.monotonic() - self.start:6.1f}s: {entry}")
            self.last = entry
        return job.split(" ", 1)[0]

    def __str__(self) -> str:
        return "\n".join(self.entries)


def diagnose(env: dict[str, str], job: str, timeline: Timeline | None = None) -> str:
    """What a test prints when a job does not do what it should: the job as slurmctld sees it, the nodes and why any
    is down or drained, the tails of the daemons' logs, and the job's timeline if one was kept."""
    state = Path(env["SLURM_CONF"]).parent
    parts = [f"--- timeline\n{timeline}"] if timeline else []
    for cmd in (["scontrol", "show", "job", job], ["sinfo", "-N", "-o", "%N %T %E"], ["squeue", "-a"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        parts.append(f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}")
    for log in [state / "slurmctld.log", *sorted(state.glob("slurmd-*.log"))]:
        lines = log.read_text(errors="replace").splitlines()[-25:] if log.exists() else []
        parts.append(f"--- {log.name}\n" + "\n".join(lines))
    return "\n".join(parts)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"SLURM test cluster: {what} within {timeout}s")


def _alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().split()[0])
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        return state not in ("Z", "X")
    except (FileNotFoundError, ValueError, IndexError):
        return False


@contextlib.contextmanager
def cluster(state: Path, ctld_port: int = 16817) -> Iterator[dict[str, str]]:
    """Yields the environment (SLURM_CONF) that clients need."""
    state.mkdir(parents=True, exist_ok=True)
    for sub in ("ctld", "spool/node1", "spool/node2", "tmp/node1", "tmp/node2", "munge"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(state / "munge", 0o711)
    key = state / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)
    socket = state / "munge" / "munge.socket"
    conf = state / "slurm.conf"
    conf.write_text(SLURM_CONF.format(ctld_port=ctld_port, munge_socket=socket, state=state))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    hosts = Path("/etc/hosts")
    original_hosts = hosts.read_text()
    procs: list[Path] = []
    try:
        hosts.write_text(original_hosts + "\n127.0.0.1 node1 node2  # retro_dist test cluster\n")
        subprocess.run(["munged", f"--socket={socket}", f"--key-file={key}", f"--pid-file={state}/munge/munged.pid",
                        f"--log-file={state}/munge/munged.log", f"--seed-file={state}/munge/munged.seed", "--force"],
                       check=True, capture_output=True)
        procs.append(state / "munge" / "munged.pid")
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env, capture_output=True)
        procs.append(state / "slurmctld.pid")
        for node in ("node1", "node2"):
            subprocess.run(["slurmd", "-f", str(conf), "-N", node], check=True, env=env, capture_output=True)
            procs.append(state / f"slurmd-{node}.pid")

        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%T %D"], env=env, capture_output=True, text=True).stdout
            return "idle 2" in out
        _wait(idle, 30, "two idle nodes")
        yield env
    finally:
        subprocess.run(["scancel", "--quiet", "--user", "root"], env=env, capture_output=True)
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
        for pidfile in procs:
            if _alive(pidfile):
                with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
                    os.kill(int(pidfile.read_text().split()[0]), 15)
        with contextlib.suppress(TimeoutError):
            _wait(lambda: not any(_alive(p) for p in procs), 10, "daemons stopped")
        hosts.write_text(original_hosts)
        shutil.rmtree(state, ignore_errors=True)
