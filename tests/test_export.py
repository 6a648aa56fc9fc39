"""`retro-dist export`: streaming consolidation of real ZeRO checkpoints (tiny runs on 2 CPU ranks) equals
DeepSpeed's own, in one file or in shards, loaded back bit-identically; bad input gets one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retro_dist.train.checkpoint import META, read_meta


def test_read_meta_names_a_missing_step_and_lists_the_available_ones(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (4, 8):
        (checkpoints / f"step_{step:08d}").mkdir(parents=True)
        (checkpoints / f"step_{step:08d}" / META).write_text(json.dumps({"step": step}) + "\n")
    (checkpoints / "step_00000012").mkdir()  # interrupted while saving: no meta.json
    with pytest.raises(ValueError) as e:
        read_meta(checkpoints, "step_00000005")
    message = str(e.value)
    assert "step 5 does not exist" in message and "4, 8" in message and "interrupted" not in message, message
    with pytest.raises(ValueError, match="interrupted while saving"):
        read_meta(checkpoints, "step_00000012")
    assert read_meta(checkpoints, "step_00000008") == {"step": 8}


# ---- real checkpoints: tiny runs on 2 CPU ranks (and 3 for another world size) -------------------------------------

RUNS = {"zero0": (2, 0, "fp32"), "zero0_bf16": (2, 0, "bf16"), "zero1": (2, 1, "fp32"), "zero2": (2, 2, "fp32"),
        "zero3": (2, 3, "fp32"), "zero3_3ranks": (3, 3, "fp32")}
TAG = "step_00000002"


def retro_dist(*args: str) -> subprocess.CompletedProcess:
    from tests.train_helpers import env
    return subprocess.run([str(Path(sys.executable).parent / "retro-dist"), *args], env=env(), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tests.train_helpers import tiny_dataset
    return tiny_dataset(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """Run directories by name, each trained lazily (2 steps, one checkpoint) the first time a test asks."""
    from tests.train_helpers import tiny_args, train
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            nproc, stage, precision = RUNS[name]
            run_dir = tmp_path_factory.mktemp(name) / "run"
            result = train(nproc, tiny_args(dataset, run_dir, "--train.steps=2", "--checkpoint.every=2",
                                            f"--train.zero_stage={stage}", "--logging.val_every=100",
                                            f"--train.precision={precision}"))
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            made[name] = run_dir
        return made[name]
    return get


def deepspeed_consolidation(run_dir: Path) -> dict[str, torch.Tensor]:
    """What DeepSpeed's own zero_to_fp32 gives (under the weights-only loader); stage 0 holds the module as is."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from retro_dist.train.safe_load import safe_torch_load
    checkpoints = run_dir / "checkpoints"
    with safe_torch_load():
        if any((checkpoints / TAG).glob("*zero_pp_rank_*")):
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=TAG)
        module = torch.load(checkpoints / TAG / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    return {k: v.float() for k, v in module.items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    different = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not different, different[:5]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_export_equals_deepspeeds_consolidation(runs, tmp_path, name):
    from retro_dist.model import RETRO
    from retro_dist.pretrained import load_pretrained
    run_dir = runs(name)
    result = retro_dist("export", str(run_dir), "--out", str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors",
                                                                      "tokenizer.json"]
    _, got = load_pretrained(tmp_path / "model")
    if name == "zero0_bf16":
        # no ZeRO partitions for DeepSpeed's tool to read: the module holds bf16 weights and the export takes the
        # optimizer's fp32 masters, which round to exactly those weights (and carry more bits than them)
        module = deepspeed_consolidation(run_dir)
        assert set(got) == set(module) and all(got[k].dtype == torch.float32 for k in got)
        assert all(torch.equal(got[k].to(torch.bfloat16).float(), module[k]) for k in module)
        assert sum(not torch.equal(got[k], module[k]) for k in module) > len(module) // 2
    else:
        assert_same(got, deepspeed_consolidation(run_dir))
    RETRO.from_pretrained(tmp_path / "model")  # strict: every name of the model, nothing else


@pytest.mark.slow
def test_sharded_export_loads_back_bit_identically(runs, tmp_path, monkeypatch):
    from retro_dist.model import RETRO
    from retro_dist.pretrained import INDEX_NAME, load_pretrained
    from retro_dist.train import export as export_module
    run_dir = runs("zero3")
    single = export_module.export(run_dir, tmp_path / "single", dtype="bf16")
    # a small read batch too, so parameters are consolidated over several passes over the ranks' files
    monkeypatch.setattr(export_module, "READ_BATCH_BYTES", 100_000)
    result = retro_dist("export", str(run_dir), "--out", str(tmp_path / "sharded"), "--dtype", "bf16",
                        "--max-shard-size", "200KB")
    assert result.returncode == 0, result.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", files
    assert "model.safetensors" not in files and INDEX_NAME in files and "config.json" in files
    index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
    _, got = load_pretrained(tmp_path / "sharded")
    _, want = load_pretrained(single)
    assert_same(got, want)
    assert set(index["weight_map"]) == set(got) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    assert all((tmp_path / "sharded" / s).stat().st_size < 200_000 + 4096 or
               len([k for k, v in index["weight_map"].items() if v == s]) == 1 for s in shards)
    a, b = RETRO.from_pretrained(tmp_path / "sharded"), RETRO.from_pretrained(single)
    assert_same(a.state_dict(), b.state_dict())
    # the same export, in process and with the small read batch, equals DeepSpeed's consolidation in bf16
    export_module.export(run_dir, tmp_path / "sharded", dtype="fp32", max_shard_size=150_000)
    _, got = load_pretrained(tmp_path / "sharded")
    assert_same(got, deepspeed_consolidation(run_dir))
    assert "model.safetensors" not in {p.name for p in (tmp_path / "sharded").iterdir()}

    # a shard the index names is missing: one clear error, from the loader and from every command that loads
    (tmp_path / "sharded" / "model-00002-of-{:05d}.safetensors".format(len(list(
        (tmp_path / "sharded").glob("model-*"))))).unlink()
    with pytest.raises(FileNotFoundError, match=r"names shard model-00002-of-\d{5}\.safetensors, which is missing"):
        RETRO.from_pretrained(tmp_path / "sharded")
    result = retro_dist("eval", "--model", str(tmp_path / "sharded"), "--dataset",
                        str(json.loads((run_dir / "config.json").read_text())["data"]["dataset"]))
    assert result.returncode == 2 and "which is missing" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_export_bad_input_one_line_nothing_written(runs, tmp_path):
    import shutil
    run_dir = runs("zero2")
    result = retro_dist("export", str(run_dir), "--step", "3", "--out", str(tmp_path / "model"))
    assert result.returncode == 2 and "step 3 does not exist" in result.stderr and "available steps: 2" in \
        result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "model").exists()

    # a checkpoint missing one rank's optimizer partition
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("tensorboard"))
    (broken / "checkpoints" / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    result = retro_dist("export", str(broken), "--out", str(tmp_path / "model"))
    assert result.returncode == 2 and "incomplete" in result.stderr and "ranks [1]" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "model").exists()

    # fp16 cannot hold a weight beyond 65504: refused, and an earlier export in --out stays as it was
    assert retro_dist("export", str(run_dir), "--out", str(tmp_path / "model")).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    from retro_dist.train.safe_load import safe_torch_load
    path = broken / "checkpoints" / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shutil.copy(run_dir / "checkpoints" / TAG / path.name, path)
    with safe_torch_load():
        state = torch.load(path, map_location="cpu")
    with torch.no_grad():
        state["optimizer_state_dict"]["single_partition_of_fp32_groups"][0][5] = 1e6
    torch.save(state, path)
    shutil.copy(run_dir / "checkpoints" / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt", path.parent)
    result = retro_dist("export", str(broken), "--out", str(tmp_path / "model"), "--dtype", "fp16")
    assert result.returncode == 2 and "beyond fp16's range" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "model"]  # no staging directory left
