"""Each launcher for real, on this machine: deepspeed (one node; two nodes emulated with a hostfile and no ssh),
mpirun, and a SLURM cluster (munge, slurmctld, two slurmd) started by the test. Same tiny run, same losses."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from data_prep.corpora import stdlib_docstrings, write_corpus
from data_prep.pipeline import main as prepare
from tests import slurm_cluster
from tests.dataset_checks import MPI_PREP_OPTS as OPTS, assert_same_dataset
from tests.train_helpers import ROOT, children, env, free_port, kill_tree, losses

pytestmark = pytest.mark.slow
STEPS = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    corpus = write_corpus(root / "corpus", stdlib_docstrings(300))
    assert prepare(["--input", str(corpus), "--out", str(root / "ds"), "--vocab-size", "512", "--chunk-size", "16",
                    "--seq-len", "64", "--embedder", "hash-64", "--num-neighbors", "2", "--shard-samples", "40"]) == 0
    return root / "ds"


def run_args(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"--data.dataset={dataset}", f"--run_dir={run_dir}", "--model.preset=tiny", "--data.micro_batch=2",
            "--data.num_workers=0", "--train.precision=fp32", f"--train.steps={STEPS}", "--logging.every=1",
            "--logging.val_every=0", "--checkpoint.every=3", "--optim.lr=3e-3", "--optim.warmup_steps=2", *extra]


def launch(script: str, args: list[str], extra_env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "launch" / script), *args], env={**env(), **extra_env}, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def local_losses(dataset, tmp_path_factory):
    result = launch("local.sh", run_args(dataset, tmp_path_factory.mktemp("local") / "local run"),
                    {"NPROC": "2", "MASTER_PORT": str(free_port())})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "on 2 cpu rank(s) (torch)" in result.stdout
    found = losses(result.stdout)
    assert sorted(found) == list(range(1, STEPS + 1))
    return found


def test_deepspeed_launcher_two_processes(local_losses):
    assert local_losses[STEPS] < local_losses[1]


def test_two_nodes_emulated_equal_one_node(dataset, local_losses, tmp_path):
    """Two deepspeed launchers without ssh, node ranks 0 and 1, rendezvous on 127.0.0.1. The run directories of the
    launcher tests have spaces in their names: every launcher passes each argument through as one word."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    procs = [subprocess.Popen([str(ROOT / "launch" / "hostfile.sh"), *run_args(dataset, tmp_path / "hostfile run")],
                              env={**env(), "HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                   "NO_SSH": "1", "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert losses(outputs[0][0]) == local_losses


@pytest.mark.mpi
def test_mpirun_two_ranks(dataset, local_losses, tmp_path):
    result = launch("mpirun.sh", run_args(dataset, tmp_path / "mpi run"), {"NP": "2", "MASTER_PORT": str(free_port())})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 cpu rank(s) (mpi)" in result.stdout
    assert losses(result.stdout) == local_losses


def _tree(pid: int) -> list[int]:
    return [pid] + [p for child in children(pid) for p in _tree(child)]


def _listening(pids: list[int]) -> set[str]:
    """Local addresses (host:port) of the TCP sockets these processes listen on, as `ss -ltnp` shows them."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3] for line in out.splitlines()
            if any(f"pid={pid}," in line for pid in pids)}


@pytest.mark.parametrize("how", ["retro-dist train", "launch/local.sh"])
def test_single_node_rendezvous_listens_on_loopback_only(dataset, how, tmp_path):
    """A one-node run opens no port to the network: the rendezvous store (rank 0's) and every other listening
    socket of the run is bound to loopback, not to *:PORT."""
    args = run_args(dataset, tmp_path / "run", "--train.steps=12", "--checkpoint.every=1000")
    cmd = ([str(ROOT / ".venv" / "bin" / "python"), "-m", "retro_dist.cli", "train", *args] if how == "retro-dist train"
           else [str(ROOT / "launch" / "local.sh"), *args])
    log = tmp_path / "log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env={**env(), "NPROC": "2", "MASTER_PORT": str(free_port())}, stdout=sink,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None and "step 2/" not in log.read_text():
                time.sleep(0.1)
            addresses = _listening(_tree(proc.pid))
            assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid, 9)
    assert addresses, "no listening socket found: the rendezvous store was not seen"
    assert all(a.startswith(("127.", "[::1]:")) for a in addresses), addresses


def test_bad_input_fails_fast_with_one_line(dataset, tmp_path):
    cases = [
        ("local.sh", ["--config", str(tmp_path / "missing.yaml")], {"NPROC": "2"}, "missing.yaml"),
        ("mpirun.sh", run_args(dataset, tmp_path / "r1", "--train.dist_timeout_s=8"),
         {"NP": "2", "MASTER_ADDR": "10.255.255.1"}, "could not join the process group at 10.255.255.1"),
        ("mpirun.sh", run_args(dataset, tmp_path / "r2", "--train.global_batch=4"), {"NP": "3"},
         "train.global_batch=4 is not a multiple of data.micro_batch=2 x 3 ranks = 6"),
    ]
    for script, args, extra, message in cases:
        if script == "mpirun.sh" and shutil.which("mpirun") is None:
            continue
        start = time.monotonic()
        result = launch(script, args, {"MASTER_PORT": str(free_port()), **extra}, timeout=180)
        errors = {l for l in (result.stdout + result.stderr).splitlines() if "retro-dist train: error:" in l}
        assert result.returncode != 0 and time.monotonic() - start < 120
        assert errors and all(message in e for e in errors), (message, result.stderr[-2000:])


@pytest.mark.parametrize("content,node_rank,message", [
    ("node0 slots=1\nnode1 slot=2\n", "0", 'line 2: "node1 slot=2" is not "hostname slots=N"'),
    ("node0 slots=0\n", "0", "line 1: host node0 has slots=0"),
    ("# two nodes\nnode0 slots=1\nnode0 slots=2\n", "0", "line 3: host node0 is listed twice (also on line 2)"),
    ("# nothing yet\n", "0", "has no hosts"),
    ("node0 slots=1\nnode1 slots=1\n", "2", "NODE_RANK=2 but hostfile"),
], ids=["syntax", "zero-slots", "duplicate", "empty", "node-rank"])
def test_bad_hostfile_is_one_line_naming_file_and_line(content, node_rank, message, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(content)
    result = launch("hostfile.sh", ["--model.preset=tiny"], {"HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1",
                                                             "NO_SSH": "1", "NODE_RANK": node_rank}, timeout=120)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stdout + result.stderr[-3000:]
    assert lines[0].startswith(f"launch/hostfile.sh: error: hostfile {hostfile}") or "NODE_RANK" in message
    assert message in lines[0], lines[0]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A two-node SLURM cluster on this machine (tests using it carry the `slurm` marker: see conftest.py)."""
    with slurm_cluster.cluster(Path("/tmp") / f"retro-slurm-{os.getpid()}") as cluster_env:
        yield cluster_env


# the test cluster has no GPUs and 2 CPUs per node: the sbatch scripts ask for 8 GPUs and 8 CPUs per task by default
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1"]


ENDED = ("", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")  # squeue's state of a job that has ended ("": gone)


def _job_done(job: str, cluster_env: dict) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=cluster_env, capture_output=True, text=True)
    return out.stdout.strip() in ENDED


def test_slurm_two_nodes(dataset, local_losses, slurm, tmp_path):
    out = tmp_path / "job.out"
    result = subprocess.run(["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", *CPU_JOB, "--time=10",
                             f"--output={out}", str(ROOT / "launch" / "slurm" / "train.sbatch"),
                             *run_args(dataset, tmp_path / "run")],
                            env={**slurm, **env(), "SLURM_CONF": slurm["SLURM_CONF"]}, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    log = out.read_text() if out.exists() else ""
    assert result.returncode == 0, result.stderr + log[-3000:]
    assert "on node[1-2], rendezvous node1:" in log and "on 2 cpu rank(s) (slurm)" in log
    assert losses(log) == local_losses


RESUME_STEPS = 60  # long enough that the signal, sent after step 8, lands well before the end


def resume_args(dataset: Path, run_dir: Path) -> list[str]:
    """DataLoader workers on (the signal reaches them too), a global batch that 1 and 2 ranks both divide, every
    dropout on (its masks follow the sample, not the rank: a resume on 1 node continues the 2-node curve)."""
    return run_args(dataset, run_dir, "--data.num_workers=1", "--train.global_batch=4",
                    f"--train.steps={RESUME_STEPS}", "--checkpoint.every=1000",
                    *(f"--model.arch.{site}_dropout=0.1" for site in ("enc_attn", "enc_ff", "dec_attn", "dec_ff")))


@pytest.fixture(scope="module")
def uninterrupted_losses(dataset, tmp_path_factory):
    """The curve every interrupted run below must continue: 2 ranks, no signal."""
    result = launch("local.sh", resume_args(dataset, tmp_path_factory.mktemp("uninterrupted") / "run"),
                    {"NPROC": "2", "MASTER_PORT": str(free_port())})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    found = losses(result.stdout)
    assert sorted(found) == list(range(1, RESUME_STEPS + 1))
    return found


@pytest.mark.parametrize("tasks,scancel", [("per-rank", ["--signal=TERM"]), ("per-node", ["--batch", "--signal=USR1"])],
                         ids=["per-rank-TERM", "per-node-USR1-to-the-script"])
def test_slurm_signal_checkpoints_requeues_and_resumes(dataset, uninterrupted_losses, slurm, tasks, scancel,
                                                       tmp_path):
    """Preemption as SLURM delivers it. per-rank: srun starts the ranks; SIGTERM as `scancel --signal=TERM` sends it,
    to every process of the job step, DataLoader workers included; the job comes back on another allocation, 1 node
    instead of 2 (1 rank with accumulation 2 instead of 2 ranks), as a new job in place of the requeued one.
    per-node: one torchrun per node, a run directory with spaces in its name; the warning signal as
    --signal=B:USR1@T sends it, to the batch script alone, which passes it on to every process of the step
    (torchrun included, as --signal=USR1@T would); the requeued job comes back on the same 2 nodes.
    Either way the ranks save and exit 75, the script requeues the job, and the resumed job continues the
    uninterrupted curve at every later step."""
    out = tmp_path / "job.out"
    cluster_env = {**slurm, **env(), "SLURM_CONF": slurm["SLURM_CONF"], "RETRO_TASKS": tasks, "NPROC_PER_NODE": "1"}
    run_dir = tmp_path / ("slurm per node" if tasks == "per-node" else "run")

    def submit(nodes: int, output: Path) -> str:
        submitted = subprocess.run(["sbatch", "--parsable", f"--nodes={nodes}", "--ntasks-per-node=1", *CPU_JOB,
                                    "--time=10", f"--output={output}", str(ROOT / "launch" / "slurm" / "train.sbatch"),
                                    *resume_args(dataset, run_dir)],
                                   env=cluster_env, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert submitted.returncode == 0, submitted.stderr
        return submitted.stdout.strip().split(";")[0]

    job = submit(2, out)
    log = lambda: out.read_text() if out.exists() else ""  # noqa: E731
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not re.search(r"^step ([8-9]|\d\d)/", log(), re.M) and \
            not _job_done(job, cluster_env):
        time.sleep(0.1)
    subprocess.run(["scancel", *scancel, job], env=cluster_env, check=True)
    timeline, released = slurm_cluster.Timeline(cluster_env, job), False
    deadline = time.monotonic() + 420  # a loaded 2-core box once needed more than 240 s for the requeued job's start
    while time.monotonic() < deadline:
        state = timeline.look()
        if state in ENDED and ("requeueing job" not in log() or "restart 1" in log()):
            break  # finished, or failed without a requeue (a requeued job waits as PENDING)
        if "requeueing job" in log() and "restart 1" not in log():
            if not state:
                break  # the job ended without coming back
            if tasks == "per-rank" and state == "PENDING":
                # the job comes back on another allocation: 1 node. (scontrol update NumNodes/NumTasks of the
                # requeued job is accepted, but its batch environment keeps SLURM_NTASKS=2: submit anew)
                subprocess.run(["scancel", job], env=cluster_env, check=True)
                out = tmp_path / "job-1-node.out"
                job = submit(1, out)
                timeline = slurm_cluster.Timeline(cluster_env, job)
                continue
            if state == "PENDING" and not released:
                # slurmctld holds a requeued job back (BeginTime, about two minutes) while its nodes finish killing
                # the last run: a batch launch before slurmd has reaped it is refused ("Job N already killed, do not
                # launch batch job") and the job ends for good. Release it once, 30 s on, not at once.
                released = subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+30"],
                                          env=cluster_env, capture_output=True).returncode == 0
        time.sleep(0.5)
    first = (tmp_path / "job.out").read_text()
    assert "checkpoint saved, exit code 75" in first and "requeueing job" in first, first[-3000:]
    text = log() if tasks == "per-rank" else log().split("restart 1")[-1]
    restarted = tasks == "per-rank" or "restart 1" in log()
    print(f"{tasks}: the job from the signal on\n{timeline}")  # pytest -s shows it
    # the log first, the cluster's side last: a shortened report keeps its head and its tail
    assert restarted, log()[-3000:] + "\n" + slurm_cluster.diagnose(cluster_env, job, timeline)
    resumed = re.search(r"resumed from step_\d{8} at step (\d+)", text)
    assert resumed and f"step {RESUME_STEPS}/{RESUME_STEPS}" in text, text[-3000:]
    assert f"on {1 if tasks == 'per-rank' else 2} cpu rank(s)" in text, text[-3000:]
    after = losses(text)
    assert sorted(after) == list(range(int(resumed.group(1)) + 1, RESUME_STEPS + 1))
    # fp32; the console prints 4 decimals
    assert after == {step: pytest.approx(uninterrupted_losses[step], abs=2e-4) for step in after}


def test_slurm_prepare_job_equals_one_process(slurm, tmp_path):
    """launch/slurm/prepare.sbatch: data_prep over 2 nodes (srun --mpi=pmix, mpi4py), same bytes as one process."""
    corpus = write_corpus(tmp_path / "corpus", stdlib_docstrings(120))
    assert prepare(["--input", str(corpus), "--out", str(tmp_path / "single"), *OPTS]) == 0
    out = tmp_path / "job.out"
    result = subprocess.run(["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", *CPU_JOB, "--time=10",
                             f"--output={out}", str(ROOT / "launch" / "slurm" / "prepare.sbatch"), "--input",
                             str(corpus), "--out", str(tmp_path / "slurm"), *OPTS],
                            env={**slurm, **env(), "SLURM_CONF": slurm["SLURM_CONF"]}, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr + (out.read_text()[-3000:] if out.exists() else "")
    assert_same_dataset(tmp_path / "single", tmp_path / "slurm", block_size=100)
