"""What a GPU run needs of the code that a CPU run cannot show by itself: collective tensors on the rank's device."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.train_helpers import ROOT, env, tiny_args, tiny_dataset

pytestmark = pytest.mark.slow  # multi-process training runs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("device"), documents=200)


def test_training_and_validation_hand_collectives_only_device_tensors(dataset, tmp_path):
    """Every all_reduce of the step loop, the stop vote, logging and validation gets a tensor made on the rank's
    device (NCCL raises "No backend type associated with device type cpu" on any other)."""
    args = tiny_args(dataset, tmp_path / "run", "--train.steps=4", "--logging.val_every=4", "--checkpoint.every=4")
    result = subprocess.run([sys.executable, "-m", "tests.strict_collectives", "train", *args], env=env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "step 4/4" in result.stdout and "val loss" in result.stdout
