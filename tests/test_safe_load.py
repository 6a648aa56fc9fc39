"""Checkpoint loading never unpickles arbitrary code, even where DeepSpeed asks for weights_only=False."""

import pickle

import pytest
import torch

from retro_dist.train.safe_load import safe_torch_load


class Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('arbitrary code ran')",))


def test_deepspeed_style_load_is_restricted(tmp_path):
    torch.save({"weights": torch.ones(2), "payload": Evil()}, tmp_path / "evil.pt")
    torch.save({"weights": torch.ones(2), "shape": torch.Size([2])}, tmp_path / "fine.pt")
    with safe_torch_load():
        with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
            torch.load(tmp_path / "evil.pt", weights_only=False)  # what DeepSpeed passes
        assert torch.equal(torch.load(tmp_path / "fine.pt", weights_only=False)["weights"], torch.ones(2))
    assert torch.load is not None and torch.load.__name__ == "load"
