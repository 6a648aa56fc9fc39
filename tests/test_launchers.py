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
from tests.train_helpers import ROOT, env, free_port, losses

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
    result = launch("local.sh", run_args(dataset, tmp_path_factory.mktemp("local") / "run"),
                    {"NPROC": "2", "MASTER_PORT": str(free_port())})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "on 2 cpu rank(s) (torch)" in result.stdout
    found = losses(result.stdout)
    assert sorted(found) == list(range(1, STEPS + 1))
    return found


def test_deepspeed_launcher_two_processes(local_losses):
    assert local_losses[STEPS] < local_losses[1]


def test_two_nodes_emulated_equal_one_node(dataset, local_losses, tmp_path):
    """Two deepspeed launchers without ssh, node ranks 0 and 1, rendezvous on 127.0.0.1."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    procs = [subprocess.Popen([str(ROOT / "launch" / "hostfile.sh"), *run_args(dataset, tmp_path / "run")],
                              env={**env(), "HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                   "NO_SSH": "1", "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert losses(outputs[0][0]) == local_losses


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (apt-get install openmpi-bin)")
def test_mpirun_two_ranks(dataset, local_losses, tmp_path):
    result = launch("mpirun.sh", run_args(dataset, tmp_path / "run"), {"NP": "2", "MASTER_PORT": str(free_port())})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 cpu rank(s) (mpi)" in result.stdout
    assert losses(result.stdout) == local_losses


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


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not slurm_cluster.available():
        pytest.skip("SLURM packages are not installed (apt-get install slurmctld slurmd slurm-client munge; "
                    ".ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd and munged as this test does needs root")
    with slurm_cluster.cluster(Path("/tmp") / f"retro-slurm-{os.getpid()}") as cluster_env:
        yield cluster_env


def _job_done(job: str, cluster_env: dict) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=cluster_env, capture_output=True, text=True)
    return out.stdout.strip() in ("", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def test_slurm_two_nodes(dataset, local_losses, slurm, tmp_path):
    out = tmp_path / "job.out"
    result = subprocess.run(["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", "--time=10", f"--output={out}",
                             str(ROOT / "launch" / "slurm" / "train.sbatch"), *run_args(dataset, tmp_path / "run")],
                            env={**slurm, **env(), "SLURM_CONF": slurm["SLURM_CONF"]}, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    log = out.read_text() if out.exists() else ""
    assert result.returncode == 0, result.stderr + log[-3000:]
    assert "on node[1-2], rendezvous node1:" in log and "on 2 cpu rank(s) (slurm)" in log
    assert losses(log) == local_losses


def test_slurm_warning_signal_checkpoints_requeues_and_finishes(dataset, slurm, tmp_path):
    out = tmp_path / "job.out"
    cluster_env = {**slurm, **env(), "SLURM_CONF": slurm["SLURM_CONF"]}
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--time=10",
                                f"--output={out}", str(ROOT / "launch" / "slurm" / "train.sbatch"),
                                *run_args(dataset, tmp_path / "run", "--train.steps=400", "--checkpoint.every=1000",
                                          "--logging.every=5")],
                               env=cluster_env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not re.search(r"^step (1[5-9]|[2-9]\d)/", out.read_text() if out.exists() else "", re.M):
        time.sleep(0.2)
    # what --signal=USR1@120 delivers before the time limit: USR1 to every task of the job's steps
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster_env, check=True)
    deadline = time.monotonic() + 240
    released = False
    while time.monotonic() < deadline and not (out.exists() and "step 400/400" in out.read_text()
                                                and _job_done(job, cluster_env)):
        if not released and "requeueing job" in out.read_text():
            # slurmctld holds a requeued job back (BeginTime) for about two minutes; no need to wait here
            time.sleep(1)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster_env)
            released = True
        time.sleep(0.5)
    log = out.read_text()
    assert "checkpoint saved, exit code 75" in log and "requeueing job" in log, log[-3000:]
    assert "restart 1" in log and re.search(r"resumed from step_\d{8} at step \d+", log)
    assert "step 400/400" in log


def test_slurm_prepare_job_equals_one_process(slurm, tmp_path):
    """launch/slurm/prepare.sbatch: data_prep over 2 nodes (srun --mpi=pmix, mpi4py), same bytes as one process."""
    from tests.test_data_prep_mpi import OPTS, assert_same_dataset
    corpus = write_corpus(tmp_path / "corpus", stdlib_docstrings(120))
    assert prepare(["--input", str(corpus), "--out", str(tmp_path / "single"), *OPTS]) == 0
    out = tmp_path / "job.out"
    result = subprocess.run(["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10",
                             f"--output={out}", str(ROOT / "launch" / "slurm" / "prepare.sbatch"), "--input",
                             str(corpus), "--out", str(tmp_path / "slurm"), *OPTS],
                            env={**slurm, **env(), "SLURM_CONF": slurm["SLURM_CONF"]}, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr + (out.read_text()[-3000:] if out.exists() else "")
    assert_same_dataset(tmp_path / "single", tmp_path / "slurm", block_size=100)
