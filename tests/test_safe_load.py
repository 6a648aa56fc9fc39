"""Checkpoint loading never unpickles arbitrary code, even where DeepSpeed asks for weights_only=False, and a file
that holds anything else is refused with one line naming it (never PyTorch's advice to pass weights_only=False)."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retro_dist.train.safe_load import UnsafeCheckpoint, safe_torch_load

from tests.train_helpers import cli


class Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('arbitrary code ran')",))


def test_deepspeed_style_load_is_restricted(tmp_path):
    torch.save({"weights": torch.ones(2), "payload": Evil()}, tmp_path / "evil.pt")
    torch.save({"weights": torch.ones(2), "shape": torch.Size([2])}, tmp_path / "fine.pt")
    with safe_torch_load():
        with pytest.raises(UnsafeCheckpoint, match=f"{tmp_path / 'evil.pt'} holds objects outside the safe "
                                                   f"allow-list of checkpoint types \\(exec\\)") as refused:
            torch.load(tmp_path / "evil.pt", weights_only=False)  # what DeepSpeed passes
        assert "\n" not in str(refused.value) and "weights_only" not in str(refused.value)
        assert torch.equal(torch.load(tmp_path / "fine.pt", weights_only=False)["weights"], torch.ones(2))
        (tmp_path / "raw.pt").write_bytes(pickle.dumps({1, 2}))  # not torch.save's format
        with pytest.raises(UnsafeCheckpoint, match=f"{tmp_path / 'raw.pt'} cannot be read as a checkpoint"):
            torch.load(tmp_path / "raw.pt", weights_only=False)
    assert torch.load is not None and torch.load.__name__ == "load"


def test_model_file_with_code_is_refused_in_one_line(tmp_path):
    """`retro-dist convert` of a .pt file that pickles code: exit 2, one line naming the file, nothing written."""
    torch.save({"token_emb.weight": torch.ones(2), "payload": Evil()}, tmp_path / "evil.pt")
    result = cli("convert", tmp_path / "evil.pt", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{tmp_path / 'evil.pt'} holds objects outside the safe allow-list" in result.stderr
    assert "never unpickles arbitrary code" in result.stderr and "weights_only" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_deepspeed_tool_under_the_rule_says_one_line(tmp_path):
    """`python -m retro_dist.train.safe_load MODULE` (how the universal-checkpoint conversion runs): the caller
    reports the last line of stderr, so the refusal is that line."""
    torch.save({"payload": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "loads_it.py").write_text(f"import torch\ntorch.load({str(tmp_path / 'evil.pt')!r}, "
                                          f"weights_only=False)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])])}
    result = subprocess.run([sys.executable, "-m", "retro_dist.train.safe_load", "loads_it"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'evil.pt'} holds objects")
