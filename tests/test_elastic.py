"""Elastic determinism (issue 15) and preemption with DataLoader workers (issue 14 item 1), on real torchrun runs of
the tiny preset in fp32 with dropout on: the same global batch gives the same loss curve at any world size /
accumulation split, a run resumed on another world size continues that curve, and SIGTERM to a rank's whole process
group (as SLURM's --signal delivers it) with a worker on still checkpoints and exits 75."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from tests.train_helpers import ROOT, children, env, tb_losses, tiny_args, tiny_dataset, torchrun_cmd, train

pytestmark = pytest.mark.slow
GLOBAL = "--train.global_batch=8"
# every dropout on: its masks must follow the sample, not the rank or the micro-batch
DROPOUT = [f"--model.arch.{site}_dropout=0.1" for site in ("enc_attn", "enc_ff", "dec_attn", "dec_ff")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("elastic"), shard_samples="20")


def run(dataset, run_dir, nproc: int, steps: int, *extra: str) -> dict[int, float]:
    result = train(nproc, tiny_args(dataset, run_dir, f"--train.steps={steps}", GLOBAL, "--logging.val_every=0",
                                    "--checkpoint.every=2", *DROPOUT, *extra), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return tb_losses(run_dir)


@pytest.fixture(scope="module")
def two_ranks(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two") / "run"
    return run_dir, run(dataset, run_dir, 2, 4)


def same_curve(got: dict[int, float], reference: dict[int, float], steps) -> None:
    for step in steps:
        assert got[step] == pytest.approx(reference[step], rel=1e-5), (step, got, reference)


@pytest.mark.parametrize("nproc, extra", [(1, ()), (4, ("--train.activation_checkpointing=every",))])
def test_same_losses_at_any_world_size(dataset, two_ranks, tmp_path, nproc, extra):
    """Global batch 8, micro batch 2, dropout on: 1 rank x accumulation 4 and 4 ranks x 1 (recomputing every block
    in backward) follow the 2 ranks x 2 curve."""
    same_curve(run(dataset, tmp_path / "run", nproc, 4, *extra), two_ranks[1], range(1, 5))


@pytest.mark.parametrize("nproc", [1, 4])
def test_resume_on_another_world_size_continues_the_curve(dataset, two_ranks, tmp_path, nproc):
    run_dir = tmp_path / "run"
    shutil.copytree(two_ranks[0], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    shutil.rmtree(run_dir / "tensorboard")
    (run_dir / "checkpoints" / "latest").write_text("step_00000002")
    same_curve(run(dataset, run_dir, nproc, 4), two_ranks[1], range(3, 5))


def test_sigterm_to_the_process_group_with_a_worker(dataset, tmp_path):
    """Issue 14 item 1: `kill -TERM -- -PGID` of rank 0 reaches its DataLoader worker too; the worker leaves the
    signal to the rank, which checkpoints at the stop step and exits 75."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(torchrun_cmd(2, tiny_args(dataset, run_dir, "--train.steps=100000",
                                                       "--checkpoint.every=100000", "--data.num_workers=1",
                                                       "--logging.val_every=0")),
                            env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = ""
    for line in proc.stdout:
        out += line
        if line.startswith("step 3/"):
            rank0 = children(proc.pid)[0]
            assert children(rank0), "rank 0 has no DataLoader worker"
            os.killpg(os.getpgid(rank0), signal.SIGTERM)
            break
    out += proc.stdout.read()
    proc.wait(timeout=120)
    assert "exitcode  : 75" in out or "exit code 75" in out, out[-3000:]
    tag = (run_dir / "checkpoints" / "latest").read_text()
    stopped = int(out.split("stopping at step ")[1].split()[0])
    assert tag == f"step_{stopped:08d}" and (run_dir / "checkpoints" / tag / "meta.json").is_file()
