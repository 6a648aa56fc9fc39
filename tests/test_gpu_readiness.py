"""The decisions a GPU run depends on, checked on CPU: which launcher started a process, which GPU a rank takes,
which precision runs fast, what MFU is measured against, how a dead NCCL peer reads, and how often the training loop
makes the host wait for the device."""

from __future__ import annotations

import itertools
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from retro_dist import precision as prec
from retro_dist.dist import DistInitError, cuda_device, discover
from retro_dist.train.metrics import datasheet_tflops

SBATCH = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
          "SLURM_JOB_NODELIST": "gpu[01-02]"}


# discovery -------------------------------------------------------------------------------------------------------

def test_mpirun_inside_an_allocation_takes_mpi_ranks():
    """mpirun in an sbatch script: every rank inherits the batch step's SLURM_PROCID=0, so SLURM must not win."""
    ranks = set()
    for r in range(4):
        env = SBATCH | {"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "4",
                        "OMPI_COMM_WORLD_LOCAL_RANK": str(r % 2), "MASTER_PORT": "29400"}
        mapped, launcher = discover(env)
        assert launcher == "mpi"
        assert (mapped["WORLD_SIZE"], mapped["LOCAL_RANK"]) == ("4", str(r % 2))
        assert mapped["MASTER_ADDR"] == "gpu01"  # the allocation's first node, where mpirun puts rank 0
        ranks.add(mapped["RANK"])
    assert ranks == {"0", "1", "2", "3"}


def test_srun_with_pmi_variables_stays_slurm():
    env = SBATCH | {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "PMI_RANK": "3", "PMI_SIZE": "4"}
    mapped, launcher = discover(env)
    assert launcher == "slurm" and mapped["RANK"] == "3" and mapped["MASTER_ADDR"] == "gpu01"
    env = SBATCH | {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "PMIX_RANK": "2"}  # srun --mpi=pmix
    assert discover(env)[1] == "slurm"


def test_torchrun_inside_an_allocation_takes_torch_ranks():
    env = SBATCH | {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu01", "MASTER_PORT": "1"}
    mapped, launcher = discover(env)
    assert launcher == "torch" and mapped["RANK"] == "5"


def test_data_prep_reads_the_same_launchers():
    """data_prep (mpi4py ranks, the GPU to embed on) and training read one module: mpirun inside an allocation gives
    each rank its own local rank, not SLURM's."""
    from retro_dist.launch_env import launched_by_mpi, local_rank
    mpirun = SBATCH | {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert launched_by_mpi(mpirun) and local_rank(mpirun) == 1
    assert not launched_by_mpi(SBATCH) and local_rank(SBATCH) == 0
    assert launched_by_mpi(SBATCH | {"SLURM_NTASKS": "2", "PMIX_RANK": "1"})  # srun --mpi=pmix


def test_mpi_without_a_world_size_is_one_line():
    with pytest.raises(DistInitError, match="world size"):
        discover({"PMIX_RANK": "0"})


# the rank's GPU ----------------------------------------------------------------------------------------------------

def test_local_rank_beyond_the_visible_gpus_is_one_line():
    with pytest.raises(DistInitError, match=r"local rank 1 needs GPU 1 but this process sees 1 GPU\(s\) "
                                            r"\(CUDA_VISIBLE_DEVICES=0\): start at most 1"):
        cuda_device(1, 1, "torch", {"CUDA_VISIBLE_DEVICES": "0"})


def test_srun_binding_one_gpu_per_task_uses_cuda0():
    assert cuda_device(5, 1, "slurm", {}) == torch.device("cuda", 0)
    assert cuda_device(5, 8, "slurm", {}) == torch.device("cuda", 5)
    with pytest.raises(DistInitError):
        cuda_device(3, 2, "slurm", {})


# precision -------------------------------------------------------------------------------------------------------

def test_auto_does_not_pick_emulated_bf16(monkeypatch):
    """V100/T4: torch says bf16 is supported, counting emulation; auto must pick fp16 there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    assert prec.resolve_precision("auto", "cuda").name == "fp16"
    with pytest.raises(ValueError, match="no native bf16"):
        prec.resolve_precision("bf16", "cuda")


@pytest.mark.parametrize("amx, capability, bf16_tflops, expected", [
    (True, "AVX512", 0.0, "bf16"),  # AMX: no timing needed
    (False, "AVX512", 0.075, "fp32"),  # Xeon without AMX: bf16 slower than fp32's 0.102
    (False, "AVX512", 0.42, "bf16"),  # EPYC with avx512_bf16: bf16 about twice fp32
    (False, "AVX2", 9.9, "fp32"),
])
def test_cpu_auto_picks_what_is_fast(monkeypatch, amx, capability, bf16_tflops, expected):
    prec.cpu_choice.cache_clear()
    monkeypatch.setattr(prec, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(prec, "matmul_tflops", lambda dtype, **_: bf16_tflops if dtype == torch.bfloat16 else 0.102)
    try:
        choice = prec.resolve_precision("auto", "cpu")
    finally:
        prec.cpu_choice.cache_clear()
    assert choice.name == expected and choice.reason


def test_fp32_on_gpu_enables_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        prec.enable_tf32("cpu", "fp32")
        assert torch.backends.cuda.matmul.allow_tf32 is False
        prec.enable_tf32("cuda", "bf16")
        assert torch.backends.cuda.matmul.allow_tf32 is False
        prec.enable_tf32("cuda", "fp32")
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# MFU ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H200", "fp32", 494.7),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA A10", "fp16", 125.0), ("NVIDIA L4", "bf16", 121.0),
    ("Some Future GPU", "bf16", None),
])
def test_mfu_denominator_is_the_datasheet_peak(name, precision, tflops):
    assert datasheet_tflops(name, precision) == tflops


# a dead peer -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [
    dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network "
                          "error, NCCL version 2.21.5 ncclRemoteError: A call failed possibly due to a network error"),
    RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE)"),
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234"),
])
def test_a_dead_peer_reads_the_same_under_nccl_and_gloo(error):
    from retro_dist.train.main import peer_failure
    assert peer_failure(error)
    assert not peer_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))


# host synchronisations per step ------------------------------------------------------------------------------------

class _Engine:
    """What Trainer asks of a DeepSpeed engine, with a loss that is a tensor computed from the batch."""

    def __init__(self):
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 0.0}])
        self.weight = torch.ones(1, requires_grad=True)

    def __call__(self, tokens, retrieved, return_loss):
        return (tokens.float().mean() * self.weight).sum()

    def backward(self, loss):
        pass

    def step(self):
        pass

    def get_global_grad_norm(self):
        return 1.0


class _Loader:
    manifest = {"seq_len": 64}
    num_neighbors = 2
    skipped = 0

    def state_dict(self):
        return {}

    def forever(self):
        for i in itertools.count():
            batch = {"tokens": torch.full((2, 65), i % 7), "retrieved": None, "position": torch.arange(2)}
            for t in (batch["tokens"], batch["position"]):
                t._host = True  # made by the loader in host memory: reading it does not wait for the device
            yield batch


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_loop_syncs_the_host_only_on_logging_steps_on_a_gpu(one_rank_group, tmp_path, monkeypatch):
    """Counted: device-to-host reads and collectives per optimizer step, with the loop set up as on a GPU."""
    from retro_dist.config import RunConfig
    from retro_dist.model import RetroConfig
    from retro_dist.train import trainer as trainer_module
    from retro_dist.train.ds_config import BatchPlan

    run = RunConfig(run_dir=str(tmp_path))
    run.train.steps, run.logging.every, run.logging.val_every, run.checkpoint.every = 30, 10, 0, 1000
    run.logging.tensorboard = False
    saved = []
    checkpointer = SimpleNamespace(save=lambda step, state: saved.append(step) or f"step_{step}")
    config = RetroConfig(num_tokens=64, max_seq_len=64, enc_dim=16, enc_depth=1, dec_dim=16, dec_depth=1,
                         dec_cross_attn_layers=(1,), heads=1, dim_head=32, chunk_size=16)
    trainer = trainer_module.Trainer(run, _Engine(), BatchPlan(2, 2, 1), loader=_Loader(), checkpointer=checkpointer,
                                     config=config, device=torch.device("cpu"), precision="fp32", peak_flops=1e12,
                                     dataset_fingerprint="x")
    trainer.asynchronous = True  # the GPU policy: the host does not wait for the device between logging steps

    syncs: list[tuple[int, str]] = []
    def counting(name, original):
        def read(self, *args, **kwargs):
            if not getattr(self, "_host", False):
                syncs.append((trainer.step, name))
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    real_all_reduce = dist.all_reduce
    monkeypatch.setattr(trainer_module.dist, "all_reduce", lambda t, *a, **k:
                        syncs.append((trainer.step, "all_reduce")) or real_all_reduce(t, *a, **k))
    assert trainer.train() == 0
    steps_with_syncs = sorted({step for step, _ in syncs})
    logging_steps = {10, 20, 30}
    # after the first logging window has measured a step, the stop vote waits for steps that sync anyway
    assert set(steps_with_syncs) - set(range(0, 11)) <= logging_steps, steps_with_syncs
    assert saved == [30]


# --device for the one-process commands ---------------------------------------------------------------------------

def test_device_option_is_checked():
    from retro_dist.device import resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}")


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_eval_and_generate_take_a_device(command, tmp_path, capsys):
    from retro_dist.cli import main
    extra = ["--prompt", "x"] if command == "generate" else []
    code = main([command, "--model", str(tmp_path / "m"), "--dataset", str(tmp_path / "d"), "--device", "cuda:99",
                 *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--device cuda:99" in err[0], err


def test_fp16_loss_scale_is_read_from_every_deepspeed_optimizer():
    """ZeRO 0 with torch's AdamW under fp16 gives DeepSpeed's unfused optimizer, whose scale is in its config."""
    from retro_dist.train.trainer import loss_scale
    assert loss_scale(SimpleNamespace(loss_scale_config=SimpleNamespace(cur_scale=512.0))) == 512.0
    assert loss_scale(SimpleNamespace(cur_scale=1024.0)) == 1024.0


# a world-size change waits on the file system, not in a collective ------------------------------------------------

def test_ranks_wait_for_the_universal_conversion_without_a_collective(tmp_path):
    import threading

    from retro_dist.train.checkpoint import wait_for_conversion
    done, failed = tmp_path / "step_universal" / "meta.json", tmp_path / "step_universal.failed"
    timer = threading.Timer(1.5, lambda: (done.parent.mkdir(), done.write_text("{}")))
    timer.start()
    wait_for_conversion(done, failed, budget_s=30)  # returns once rank 0's completion mark appears
    done.unlink()
    failed.write_text("could not convert step to a universal checkpoint (disk full)")
    with pytest.raises(ValueError, match="disk full"):  # rank 0's one line, on every rank
        wait_for_conversion(done, failed, budget_s=30)
    failed.unlink()
    with pytest.raises(ValueError, match="did not finish converting"):
        wait_for_conversion(done, failed, budget_s=0.5)
