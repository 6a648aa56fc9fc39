"""RunConfig: preset defaults, a YAML or JSON file, --section.key=value overrides, one-line errors; batch plan."""

import json

import pytest

from retro_dist.config import load_run_config
from retro_dist.train.ds_config import batch_plan


def test_yaml_then_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text("data:\n  dataset: /data/x\n  micro_batch: 4\noptim:\n  lr: 0.001\n"
                                       "model:\n  preset: reference\n  arch:\n    dec_depth: 8\n")
    config = load_run_config(str(tmp_path / "run.yaml"), ["--optim.lr=3e-4", "--model.arch.dec_attn_dropout=0.1",
                                                          "--optim.betas=[0.9,0.99]", "--data.retrieval=false"])
    assert config.data.micro_batch == 4 and config.optim.lr == 3e-4 and config.optim.betas == (0.9, 0.99)
    assert config.model.arch == {"dec_depth": 8, "dec_attn_dropout": 0.1} and config.data.retrieval is False
    (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
    assert load_run_config(str(tmp_path / "run.json")).to_dict() == config.to_dict()


@pytest.mark.parametrize("overrides, message", [
    (["--data.dataset=x", "--train.zero_stage=4"], "train.zero_stage=4 must be 0, 1, 2 or 3"),
    (["--data.dataset=x", "--train.zerostage=1"], "unknown config key 'train.zerostage'"),
    (["--data.dataset=x", "--train.steps=ten"], "train.steps='ten' is not an int"),
    (["--data.dataset=x", "--train.activation_checkpointing=some"], "must be none, every or every:N"),
    (["--data.dataset=x", "--model.preset=huge"], "model.preset='huge' is unknown"),
    ([], "data.dataset is empty"),
    (["data.dataset"], "must look like --section.key=value"),
    (["--data.dataset=x", "--model.arch.num_tokens=500"], "model.arch.num_tokens cannot be set: it comes from the "
                                                          "dataset's manifest"),
    (["--data.dataset=x", "--model.arch.max_seq_len=4096"], "model.arch.max_seq_len cannot be set"),
    (["--data.dataset=x", "--model.arch.dec_depht=4"], "model.arch.dec_depht is not a model setting; valid keys: "
                                                       "enc_dim, "),
])
def test_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, overrides)


def test_batch_plan():
    assert batch_plan(0, 4, 2).global_batch == 8
    plan = batch_plan(32, 4, 2)
    assert (plan.micro_batch, plan.accumulation, plan.world_size) == (4, 4, 2)
    with pytest.raises(ValueError, match="not a multiple of data.micro_batch=4 x 3 ranks = 12"):
        batch_plan(32, 4, 3)
