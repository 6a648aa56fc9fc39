"""Faults as clusters deliver them: refused resumes and refused prepares change nothing, one job per directory,
ranks die with their launcher, and what killed runs left is removed by the next one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.corpora import stdlib_docstrings, write_corpus
from data_prep.pipeline import main as prepare
from tests.mpi_helpers import MPI_ENV, MPIRUN
from tests.train_helpers import ROOT, children, env, tiny_args, torchrun_cmd

pytestmark = pytest.mark.slow
PREP = ["--vocab-size", "512", "--chunk-size", "16", "--seq-len", "64", "--embedder", "hash-64", "--num-neighbors",
        "2", "--val-fraction", "0.05"]


def prepare_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "data_prep", *args]


def train_cmd(*args: str) -> list[str]:
    """`retro-dist train` as one process started from a shell (the `single` launcher)."""
    return [sys.executable, "-m", "retro_dist.cli", "train", *args]


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, the lock file left out (it names its last holder)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


def error_lines(stderr: str, prog: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: error:")]


def wait_for(predicate, what: str, limit_s: float = 240.0) -> None:
    """Poll until `predicate()`; the limit only turns a hang into a failure, it measures nothing."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c", stdlib_docstrings(400))


@pytest.fixture(scope="module")
def dataset(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "ds"
    assert prepare(["--input", str(corpus), "--out", str(out), "--shard-samples", "40", *PREP]) == 0
    return out


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory):
    """Same shapes, other text: a resume on it must be refused."""
    root = tmp_path_factory.mktemp("other")
    corpus = write_corpus(root / "c", stdlib_docstrings(300))
    assert prepare(["--input", str(corpus), "--out", str(root / "ds"), "--shard-samples", "40", *PREP]) == 0
    return root / "ds"


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A run directory with whole checkpoints, config.json, ds_config.json and TensorBoard events."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = run(train_cmd(*tiny_args(dataset, run_dir, "--train.steps=4")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "tensorboard").is_dir() and (run_dir / "config.json").is_file()
    return run_dir


# refused resume ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, ranks, message", [
    ("dataset", 1, "another dataset"),
    ("shape", 1, "does not fit this model (Error(s) in loading state_dict for RETRO: Missing key(s) in state_dict: "
                 "\"decoder.blocks.2."),
    ("dataset", 2, "another dataset"),  # through a universal checkpoint, made for the resume and removed again
])
def test_a_refused_resume_writes_nothing_into_the_run(dataset, other_dataset, trained, tmp_path, change, ranks,
                                                      message):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = snapshot(run_dir)
    args = (tiny_args(other_dataset, run_dir, "--train.steps=8") if change == "dataset" else
            tiny_args(dataset, run_dir, "--train.steps=8", "--model.arch.dec_depth=3"))
    result = run(train_cmd(*args) if ranks == 1 else torchrun_cmd(ranks, args))
    assert result.returncode != 0, result.stderr[-3000:]
    lines = error_lines(result.stderr, "retro-dist train")
    assert len(lines) == ranks and message in lines[0], result.stderr[-3000:]
    if ranks == 2:
        assert "universal checkpoint" in result.stdout
    assert snapshot(run_dir) == before
    exported = run([sys.executable, "-m", "retro_dist.cli", "export", str(run_dir)])
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (run_dir / "export" / "tokenizer.json").read_bytes() == (dataset / "tokenizer.json").read_bytes()


# refused prepare -----------------------------------------------------------------------------------------------


def test_a_refused_prepare_leaves_the_manifest_and_a_changed_input_still_invalidates(dataset, corpus, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    before = (ds / "manifest.json").read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(prepare_cmd("--input", str(empty), "--out", str(ds)))
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(error_lines(result.stderr, "retro-dist prepare")) == 1
    assert (ds / "manifest.json").read_bytes() == before

    more = tmp_path / "more.txt"
    more.write_text("A new document that changes the inputs. " * 200)
    assert prepare(["--input", str(corpus), str(more), "--out", str(ds), "--stage", "tokenize"]) == 0
    manifest = json.loads((ds / "manifest.json").read_text())
    assert manifest["stages"]["tokenize"]["done"] and str(more) in manifest["config"]["inputs"]
    assert not any(manifest["stages"][s]["done"] for s in ("embed", "index", "neighbors", "shard"))


def test_a_refused_prepare_of_a_new_directory_leaves_no_manifest(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare(["--input", str(empty), "--out", str(tmp_path / "ds"), *PREP]) == 2
    assert not (tmp_path / "ds" / "manifest.json").exists()


# one job per directory -----------------------------------------------------------------------------------------


def test_a_second_training_on_the_run_directory_is_refused_and_the_first_goes_on(dataset, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(train_cmd(*tiny_args(dataset, run_dir, "--train.steps=8")), env=env(), cwd=ROOT,
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "step 1/8" in log.read_text() or first.poll() is not None, "the first run's first step")
        first.send_signal(signal.SIGSTOP)  # frozen, it still holds the lock: the second run meets it for sure
        second = subprocess.run(torchrun_cmd(2, tiny_args(dataset, run_dir, "--train.steps=8")), env=env(),
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        first.send_signal(signal.SIGCONT)
        assert second.returncode != 0
        lines = error_lines(second.stderr, "retro-dist train")
        assert len(lines) == 2 and lines[0] == lines[1], second.stderr[-3000:]  # both ranks, the same line
        assert f"pid {first.pid}," in lines[0] and "in use by another training job" in lines[0]
        assert "command `" in lines[0] and "host " in lines[0] and "started " in lines[0]
        assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert "step 8/8" in log.read_text()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000008"




@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.mpi)])
def test_a_second_prepare_on_the_dataset_is_refused_in_one_line(corpus, tmp_path, ranks):
    out = tmp_path / "ds"
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = subprocess.Popen(prepare_cmd("--input", str(corpus), "--out", str(out), *PREP), env=env(),
                                 cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: f"pid {first.pid}," in _text(out / ".lock") or first.poll() is not None, "the first lock")
        first.send_signal(signal.SIGSTOP)
        cmd = prepare_cmd("--input", str(corpus), "--out", str(out), *PREP)
        second = subprocess.run(cmd if ranks == 1 else [MPIRUN, "-np", str(ranks), *cmd], env={**env(), **MPI_ENV},
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        first.send_signal(signal.SIGCONT)
        assert second.returncode != 0
        lines = error_lines(second.stderr, "retro-dist prepare")
        assert len(lines) == ranks and len(set(lines)) == 1, second.stderr[-3000:]  # every rank, the same line
        assert second.stderr.count("retro-dist prepare: error:") == ranks
        assert "in use by another prepare job" in lines[0] and f"pid {first.pid}," in lines[0], lines[0]
        if ranks == 1:
            assert second.returncode == 2 and second.stderr.strip() == lines[0]  # nothing but that line
        assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert json.loads((out / "manifest.json").read_text())["stages"]["shard"]["done"]


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


# launcher death ------------------------------------------------------------------------------------------------


def test_ranks_exit_when_their_launcher_is_killed_and_a_relaunch_resumes(dataset, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "launcher.log"
    with open(log, "w") as out:  # a file, not a pipe: the ranks outlive the launcher's end of it
        launcher = subprocess.Popen(torchrun_cmd(2, tiny_args(dataset, run_dir, "--train.steps=100000")), env=env(),
                                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    ranks: list[int] = []
    try:
        wait_for(lambda: "step 5/" in log.read_text() or launcher.poll() is not None, "step 5")
        ranks = children(launcher.pid)
        assert len(ranks) == 2 and (run_dir / "checkpoints" / "latest").is_file()
        launcher.kill()  # SIGKILL to the launcher alone: its ranks are in their own process groups
        launcher.wait()
        wait_for(lambda: not any(_alive(pid) for pid in ranks), "the ranks to exit", limit_s=60)
    finally:
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert "launcher (pid" in log.read_text() and "died" in log.read_text()
    done = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    relaunch = subprocess.run(torchrun_cmd(2, tiny_args(dataset, run_dir, f"--train.steps={done + 2}")), env=env(),
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert f"resumed from step_{done:08d}" in relaunch.stdout


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (dead launcher's) reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# leftovers -----------------------------------------------------------------------------------------------------


def test_the_next_prepare_removes_what_a_killed_shard_left(dataset, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    killed = subprocess.Popen(prepare_cmd("--out", str(ds), "--stage", "shard", "--shard-samples", "1"), env=env(),
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: any(ds.glob(".shards.tmp-*/*.tar")) or killed.poll() is not None, "shard's temporaries")
    killed.kill()
    assert killed.wait() == -signal.SIGKILL
    assert any(ds.glob(".shards.tmp-*"))
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process now
    dead = ds / "db" / f".embeddings.npy.tmp-{gone.pid}"
    live = ds / "db" / f".embeddings.npy.tmp-{os.getpid()}"
    dead.write_bytes(b"left by a killed writer")
    live.write_bytes(b"being written by a live process")

    assert prepare(["--out", str(ds), "--stage", "tokenize"]) == 0  # up to date: skips, but cleans up
    assert not any(ds.glob(".shards.tmp-*")) and not dead.exists() and live.exists()
