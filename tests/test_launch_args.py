"""What each launcher hands the program it starts, on a GPU node and on a CPU node, without GPUs: fake `nvidia-smi`,
`deepspeed`, `mpirun`, `srun`, `scontrol` and venv `python` on PATH record their arguments and environment; the
launchers themselves (bash) are the real ones. The sbatch scripts run their body under bash with that fake srun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
VARS = ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR", "MALLOC_MMAP_THRESHOLD_", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "NCCL_DEBUG", "OMP_NUM_THREADS", "SRUN_CPUS_PER_TASK", "PYTHONUNBUFFERED")
RECORDER = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({{"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                          "env": {{k: os.environ.get(k) for k in {VARS!r}}}}}) + "\\n")
if os.path.basename(sys.argv[0]) == "scontrol":
    print("node1")
"""
GPUS_8 = "\n".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08x}-aaaa)" for i in range(8)) + "\n"
MIG = ("GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-0000)\n"
       "  MIG 3g.20gb     Device  0: (UUID: MIG-0000-a)\n  MIG 3g.20gb     Device  1: (UUID: MIG-0000-b)\n"
       "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-0001)\n"
       "  MIG 3g.20gb     Device  0: (UUID: MIG-0001-a)\n  MIG 3g.20gb     Device  1: (UUID: MIG-0001-b)\n")
TRAIN = ["--config", "my run.yaml", "--train.zero_stage=2"]


class Fakes:
    def __init__(self, root: Path, smi: str | None):
        self.bin, self.venv, self.log = root / "bin", root / "venv", root / "calls.jsonl"
        for d in (self.bin, self.venv / "bin"):
            d.mkdir(parents=True)
        for name in ("deepspeed", "mpirun", "srun", "torchrun", "scontrol"):
            self._script(self.bin / name, RECORDER)
        for name in ("deepspeed", "python"):
            self._script(self.venv / "bin" / name, RECORDER)
        if smi is not None:  # prints what `nvidia-smi -L` prints on such a node
            (root / "smi.txt").write_text(smi)
            self._script(self.bin / "nvidia-smi", f"#!/bin/sh\ncat '{root / 'smi.txt'}'\n")

    @staticmethod
    def _script(path: Path, text: str) -> None:
        path.write_text(text)
        path.chmod(0o755)

    def env(self, venv: Path | None = None, **extra: str) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k not in VARS and not k.startswith(("SLURM_", "OMPI_", "PMI"))}
        return {**keep, "PATH": f"{self.bin}:/usr/bin:/bin", "FAKE_LOG": str(self.log),
                "RETRO_VENV": str(venv or self.venv), "MASTER_ADDR": "127.0.0.1", **extra}

    def calls(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def call(self, prog: str) -> dict:
        found = [c for c in self.calls() if c["prog"] == prog]
        assert found, f"{prog} was not started; calls: {self.calls()}"
        return found[-1]


def run(script: str, fakes: Fakes, args: list[str] = TRAIN, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=fakes.env(**env), capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def hostfile(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "hosts").write_text("node0 slots=8\n")
    return {"HOSTFILE": str(tmp_path / "hosts"), "NO_SSH": "1", "NODE_RANK": "0"}


# --- local.sh: GPUs as CUDA_VISIBLE_DEVICES and nvidia-smi give them ---

def test_local_keeps_the_users_gpus(tmp_path):
    fakes = Fakes(tmp_path, GPUS_8)
    result = run("local.sh", fakes, CUDA_VISIBLE_DEVICES="4,5,6,7")
    assert result.returncode == 0, result.stderr
    argv = fakes.call("deepspeed")["argv"]
    assert argv[:2] == ["--include", "localhost:4,5,6,7"] and "--num_gpus" not in argv, argv
    assert argv[-len(TRAIN):] == TRAIN  # every argument one word, "my run.yaml" included


def test_local_counts_gpus_not_mig_slices(tmp_path):
    fakes = Fakes(tmp_path, MIG)
    assert run("local.sh", fakes).returncode == 0
    assert fakes.call("deepspeed")["argv"][:2] == ["--include", "localhost:0,1"]


def test_local_nproc_takes_the_first_visible_gpus(tmp_path):
    fakes = Fakes(tmp_path, GPUS_8)
    assert run("local.sh", fakes, CUDA_VISIBLE_DEVICES="2,3,5", NPROC="2").returncode == 0
    assert fakes.call("deepspeed")["argv"][:2] == ["--include", "localhost:2,3"]


@pytest.mark.parametrize("env,message", [
    ({"CUDA_VISIBLE_DEVICES": "0,1", "NPROC": "4"}, "NPROC=4 but 2 GPU(s) are visible (0,1)"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-0000a,GPU-0000b"}, "takes GPU indices (0,1,...), not UUIDs"),
], ids=["nproc-above-gpus", "uuids"])
def test_local_bad_gpu_request_is_one_line(tmp_path, env, message):
    fakes = Fakes(tmp_path, GPUS_8)
    result = run("local.sh", fakes, **env)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stdout + result.stderr
    assert lines[0].startswith("launch/local.sh: error: ") and not fakes.calls()


def test_gpu_node_sets_up_the_node_before_the_ranks(tmp_path):
    """local.sh on a GPU node: one process checks that torch sees the GPUs and builds the ops the run JIT-compiles
    (DeepSpeedCPUAdam under ZeRO-Offload), then the launcher starts the ranks."""
    fakes = Fakes(tmp_path, GPUS_8)
    assert run("local.sh", fakes).returncode == 0
    progs = [c["prog"] for c in fakes.calls()]
    assert progs == ["python", "deepspeed"], progs
    assert fakes.calls()[0]["argv"] == ["-m", "retro_dist.launch.node_setup", "--check-gpus", "--build", "auto", "--",
                                        *TRAIN]


# --- mpirun.sh ---

def test_mpirun_on_gpu_node_exports_no_empty_accelerator(tmp_path):
    fakes = Fakes(tmp_path, GPUS_8)
    assert run("mpirun.sh", fakes).returncode == 0
    argv = fakes.call("mpirun")["argv"]
    assert not any("DS_ACCELERATOR" in a for a in argv), argv
    assert argv[-len(TRAIN) - 4:] == [str(fakes.venv / "bin" / "python"), "-m", "retro_dist.cli", "train", *TRAIN]


def test_mpirun_passes_a_set_accelerator(tmp_path):
    fakes = Fakes(tmp_path, GPUS_8)
    assert run("mpirun.sh", fakes, DS_ACCELERATOR="cuda").returncode == 0
    call = fakes.call("mpirun")
    exported = [call["argv"][i + 1] for i, a in enumerate(call["argv"]) if a == "-x"]
    assert "DS_ACCELERATOR" in exported and call["env"]["DS_ACCELERATOR"] == "cuda", call


# --- the ranks' environment: MALLOC_MMAP_THRESHOLD_ on CPU ranks, NCCL variables on GPU ranks ---

def _rank_env(script: str, fakes: Fakes, tmp_path: Path, **env: str) -> dict:
    extra = hostfile(tmp_path) if script == "hostfile.sh" else {}
    result = run(script, fakes, **extra, **env)
    assert result.returncode == 0, result.stderr
    call = fakes.call("mpirun" if script == "mpirun.sh" else "deepspeed")
    if script == "mpirun.sh":  # mpirun hands a rank only what -x names
        exported = {call["argv"][i + 1] for i, a in enumerate(call["argv"]) if a == "-x"}
        return {k: v for k, v in call["env"].items() if k in exported}
    return call["env"]


@pytest.mark.parametrize("script", ["local.sh", "hostfile.sh", "mpirun.sh"])
def test_cpu_ranks_return_freed_memory(script, tmp_path):
    env = _rank_env(script, Fakes(tmp_path / "default", None), tmp_path, CUDA_VISIBLE_DEVICES="")
    assert env["MALLOC_MMAP_THRESHOLD_"] == "65536" and env["DS_ACCELERATOR"] == "cpu", env
    assert env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") is None
    env = _rank_env(script, Fakes(tmp_path / "user", None), tmp_path, CUDA_VISIBLE_DEVICES="",
                    MALLOC_MMAP_THRESHOLD_="131072")
    assert env["MALLOC_MMAP_THRESHOLD_"] == "131072"  # the user's value wins


@pytest.mark.parametrize("script", ["local.sh", "hostfile.sh", "mpirun.sh"])
def test_gpu_ranks_get_nccl_settings(script, tmp_path):
    env = _rank_env(script, Fakes(tmp_path / "default", GPUS_8), tmp_path)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["NCCL_DEBUG"] == "WARN", env
    assert env.get("MALLOC_MMAP_THRESHOLD_") is None and env.get("DS_ACCELERATOR") is None
    env = _rank_env(script, Fakes(tmp_path / "user", GPUS_8), tmp_path, NCCL_DEBUG="INFO",
                    TORCH_NCCL_ASYNC_ERROR_HANDLING="3")
    assert env["NCCL_DEBUG"] == "INFO" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"  # the user's values win


def test_demo_ranks_keep_glibc_malloc_speed(tmp_path, monkeypatch):
    """The demo's training step, as it calls launch/local.sh, on a CPU node."""
    from retro_dist import demo

    started = []
    monkeypatch.setattr(demo, "_run", lambda command, *, shown=None, env=None: started.append((command, env)))
    demo.train(tmp_path / "data", tmp_path / "run", nproc=2, steps=3)
    (command, env), = started
    fakes = Fakes(tmp_path / "fakes", None)
    result = subprocess.run(command, env={**fakes.env(), **env, "RETRO_VENV": str(fakes.venv),
                                          "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    call = fakes.call("deepspeed")
    # the demo's small model keeps glibc's malloc speed; other CPU runs through the launchers get 64 KiB
    assert call["argv"][:2] == ["--num_gpus", "2"] and call["env"]["MALLOC_MMAP_THRESHOLD_"] == "33554432"


def test_demo_default_processes_are_the_gpus(monkeypatch):
    import torch

    from retro_dist import demo

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert demo.default_nproc() == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert demo.default_nproc() == 2


# --- node setup: which ops a run JIT-builds ---

@pytest.mark.parametrize("args,ops", [
    (["--data.dataset=data/x", "--train.zero_stage=3",
      f"--train.ds_config={ROOT / 'ds_configs' / 'zero3_offload.json'}"], "cpu_adam"),
    (["--data.dataset=data/x", "--train.zero_stage=2"], ""),
])
def test_node_setup_names_the_ops_to_build(args, ops):
    result = subprocess.run([sys.executable, "-m", "retro_dist.launch.node_setup", "--ops", "--", *args],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and result.stdout.strip() == ops, result.stderr


# --- SLURM: what the sbatch scripts ask for, and their body under bash ---

def _directives(name: str) -> dict[str, str]:
    text = (LAUNCH / "slurm" / name).read_text()
    return dict(m.groups() for m in re.finditer(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))


@pytest.mark.parametrize("name", ["train.sbatch", "prepare.sbatch"])
def test_sbatch_asks_for_gpus_and_cpus(name):
    d = _directives(name)
    assert d.get("gpus-per-node") == "8" and d.get("ntasks-per-node") == d["gpus-per-node"], d
    assert int(d.get("cpus-per-task", 0)) >= 2, d


def _slurm_env(**extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
            "SLURM_SUBMIT_DIR": str(ROOT), "TMPDIR": extra.pop("TMPDIR"), **extra}


@pytest.mark.parametrize("name", ["train.sbatch", "prepare.sbatch"])
def test_sbatch_gpus_torch_cannot_see_is_one_line(name, tmp_path):
    """The job holds GPUs (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES) but this venv's torch (a CPU build) sees none:
    one line and exit 2 before any rank starts, instead of a silent CPU run."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    fakes = Fakes(tmp_path, GPUS_8)
    env = fakes.env(venv=ROOT / ".venv", **_slurm_env(TMPDIR=str(tmp_path), SLURM_GPUS_ON_NODE="8",
                                                      CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", SLURM_CPUS_PER_TASK="8"))
    result = subprocess.run(["bash", str(LAUNCH / "slurm" / name), *TRAIN], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "error" in line]
    assert result.returncode == 2 and len(errors) == 1, result.stdout + result.stderr
    assert "has GPUs (SLURM_GPUS_ON_NODE=8, CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7)" in errors[0] and \
        "sees none" in errors[0], errors
    assert not [c for c in fakes.calls() if c["prog"] == "srun"]


def test_sbatch_cpu_job_passes_cpus_and_malloc_to_srun(tmp_path):
    fakes = Fakes(tmp_path, None)
    env = fakes.env(venv=ROOT / ".venv", **_slurm_env(TMPDIR=str(tmp_path), SLURM_CPUS_PER_TASK="4",
                                                      CUDA_VISIBLE_DEVICES=""))
    result = subprocess.run(["bash", str(LAUNCH / "slurm" / "train.sbatch"), *TRAIN], env=env, capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    call = fakes.call("srun")
    assert call["argv"][-len(TRAIN) - 2:] == [str(ROOT / ".venv" / "bin" / "retro-dist"), "train", *TRAIN]
    assert call["env"]["SRUN_CPUS_PER_TASK"] == "4" and call["env"]["OMP_NUM_THREADS"] == "4"
    assert call["env"]["MALLOC_MMAP_THRESHOLD_"] == "65536" and call["env"]["DS_ACCELERATOR"] == "cpu"
