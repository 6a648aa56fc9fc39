"""ZeRO-3 from construction: the model is partitioned as it is created, starts from the weights of a plain build on
1, 2 and 4 ranks, counts its parameters in full, and trains to the same losses as ZeRO-2 with the same global batch.

Real DeepSpeed engines on CPU ranks (gloo). This file is also the worker that torchrun starts: each rank builds the
tiny preset (DeepNet init on, so the init that runs after the submodules exist is covered) under ZeRO-2 and then
under ZeRO-3 from the resolved ds_configs, trains a few steps on one fixed global batch split over the ranks (the
same batch every step, so the loss must fall), and rank 0 prints what it saw as one JSON line.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.train_helpers import ROOT, env, losses, tiny_args, tiny_dataset, train

GLOBAL_BATCH, STEPS, SEQ, CHUNK = 4, 3, 64, 16


def _config():
    from retro_dist.model.presets import preset_config
    return preset_config("tiny", num_tokens=512, max_seq_len=SEQ, chunk_size=CHUNK, use_deepnet=True)


def _train(stage: int, world: int, rank: int) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist

    from retro_dist import RETRO
    from retro_dist.config import load_run_config
    from retro_dist.train.build import build_model
    from retro_dist.train.ds_config import batch_plan, build_ds_config, engine_settings
    from retro_dist.train.parallelize import param_groups

    run = load_run_config(None, ["--data.dataset=unused", f"--train.zero_stage={stage}", "--optim.lr=3e-3",
                                 "--train.seed=7"])  # the dataset is never read: the batches are made here
    plan = batch_plan(GLOBAL_BATCH, 1, world)
    ds_config = build_ds_config(run, engine_settings(run), plan, "fp32")
    model, count = build_model(_config(), ds_config, seed=7, activation_checkpointing="every")
    torch.manual_seed(7)
    plain = RETRO(_config())
    out = {"count": count, "plain_count": plain.num_parameters,
           # a parameter partitioned at construction is an empty placeholder with its partition beside it
           "partitioned": all(p.numel() == 0 and p.ds_tensor is not None for p in model.parameters())
           if stage == 3 else None,
           "decay": [sum(getattr(p, "ds_numel", p.numel()) for p in g["params"])
                     for g in param_groups(model, run.optim.weight_decay)],
           "plain_decay": [sum(p.numel() for p in g["params"]) for g in param_groups(plain, run.optim.weight_decay)]}
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        out["init_max_diff"] = max((a - b).abs().max().item() for a, b in zip(params, plain.parameters()))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, run.optim.weight_decay),
                                           config=ds_config)
    data = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 512, (GLOBAL_BATCH, SEQ + 1), generator=data)
    retrieved = torch.randint(0, 512, (GLOBAL_BATCH, SEQ // CHUNK, 2, 2 * CHUNK), generator=data)
    out["losses"] = []
    for _ in range(STEPS):
        total = torch.zeros(())
        for micro in range(plan.accumulation):  # rank r takes samples r*acc .. r*acc + acc - 1 of the global batch
            i = rank * plan.accumulation + micro
            loss = engine(tokens[i:i + 1], retrieved[i:i + 1], return_loss=True)
            engine.backward(loss)
            engine.step()
            total += loss.detach() / GLOBAL_BATCH
        dist.all_reduce(total)
        out["losses"].append(total.item())
    engine.destroy()
    return out


def worker() -> None:
    import torch.distributed as dist

    from retro_dist.dist import init_distributed
    info = init_distributed()
    result = {stage: _train(stage, info.world_size, info.rank) for stage in (2, 3)}
    if info.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _launch(nproc: int) -> dict:
    from retro_dist.dist import free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), __file__]
    out = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    return {int(stage): r for stage, r in json.loads(lines[0][7:]).items()}


@pytest.fixture(scope="module")
def results() -> dict[int, dict]:
    return {world: _launch(world) for world in (1, 2, 4)}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_zero3_builds_partitioned_from_the_plain_weights(results, world):
    zero3 = results[world][3]
    assert zero3["partitioned"]
    assert zero3["init_max_diff"] == 0.0 and results[world][2]["init_max_diff"] == 0.0
    assert zero3["count"] == zero3["plain_count"] > 0
    assert zero3["decay"] == zero3["plain_decay"]  # weight decay still reaches the matrices


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_zero3_losses_equal_zero2_at_every_world_size(results, world):
    zero2, zero3 = results[world][2]["losses"], results[world][3]["losses"]
    assert zero3 == pytest.approx(zero2, abs=2e-4)
    assert zero3 == pytest.approx(results[1][2]["losses"], abs=2e-4)  # and the world size does not matter
    assert zero2[-1] < zero2[0] - 0.1  # the steps trained something


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("zero3"))


@pytest.mark.slow
def test_train_cli_under_zero3_counts_every_parameter_and_resumes_exactly(dataset, tmp_path):
    """`retro-dist train` at stage 3 with activation checkpointing: the start-up line counts the whole model (it
    said 0.0M once parameters were partitioned), and a resume from a stage-3 checkpoint repeats the losses."""
    from retro_dist import RETRO
    from retro_dist.data.format import load_manifest
    from retro_dist.model.presets import preset_config
    m = load_manifest(dataset)
    expected = RETRO(preset_config("tiny", num_tokens=m["vocab_size"], max_seq_len=m["seq_len"],
                                   chunk_size=m["chunk_size"], pad_id=m["pad_id"])).num_parameters
    run_dir = tmp_path / "run"
    args = tiny_args(dataset, run_dir, "--train.steps=8", "--train.zero_stage=3", "--logging.val_every=0",
                     "--train.activation_checkpointing=every")
    first = train(2, args)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert re.search(rf"training {expected / 1e6:.1f}M parameters .* ZeRO 3,", first.stdout), first.stdout[-2000:]
    shutil.rmtree(run_dir / "checkpoints" / "step_00000008")
    (run_dir / "checkpoints" / "latest").write_text("step_00000004")
    resumed = train(2, args)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resumed from step_00000004" in resumed.stdout
    after, before = losses(resumed.stdout), losses(first.stdout)
    assert sorted(after) == [5, 6, 7, 8]
    for step, loss in after.items():
        assert loss == pytest.approx(before[step], abs=2e-4), step


if __name__ == "__main__":
    worker()
