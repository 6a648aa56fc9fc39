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
