"""The model reads its neighbors: on the copy task, trained through the real pipeline (data_prep, 2 ranks under
torchrun, DeepSpeed, export, eval), validation loss with true neighbors falls below half the loss with random ones.

Documents of random words, each written twice and shuffled apart (data_prep.corpora, aligned variant): the second
copy's words can only come from the first copy, which retrieval finds. Without the aligned chunked cross-attention
positions (RetroConfig.cca_positions) and without dropping the encoder's cross-attention, this model does not learn
to copy in this budget (bench/copy_task.py prints those arms' curves).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.corpora import prepare_copy_task
from tests.train_helpers import env, train

pytestmark = pytest.mark.slow
STEPS = 300


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy")
    dataset = prepare_copy_task(root, aligned=True, num_docs=3000, seq_len=256, chunks_per_doc=4)
    run_dir = root / "run"
    result = train(2, [f"--data.dataset={dataset}", f"--run_dir={run_dir}", "--model.preset=tiny",
                       "--data.micro_batch=8", "--data.num_workers=0", "--train.global_batch=16",
                       f"--train.steps={STEPS}", "--train.precision=fp32", "--optim.lr=3e-3",
                       "--optim.warmup_steps=30", f"--logging.val_every={STEPS}", "--logging.val_samples=0",
                       "--logging.every=50", f"--checkpoint.every={STEPS}"], timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    export = subprocess.run([str(Path(sys.executable).parent / "retro-dist"), "export", str(run_dir)], env=env(),
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-2000:]
    report = subprocess.run([str(Path(sys.executable).parent / "retro-dist"), "eval", "--model",
                             str(run_dir / "export"), "--dataset", str(dataset), "--json"], env=env(),
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    return json.loads(report.stdout)


def test_true_neighbors_halve_the_loss_of_random_ones(trained):
    loss = trained["loss"]
    assert loss["true"] <= 0.5 * loss["random"], loss
    assert loss["true"] < loss["off"] - 1.0, loss  # not capacity alone: retrieval off is far worse too


def test_the_gain_is_in_the_copied_chunks(trained):
    """Chunks whose continuation is in the neighbor (overlap > 75%) are where true neighbors win; in chunks with no
    overlap (the next document starts) true and random neighbors are alike."""
    buckets = {b["overlap"]: b for b in trained["overlap_buckets"]}
    copied, none = buckets["(0.75, 1]"], buckets["[0, 0.125]"]
    assert copied["chunks"] > 0 and none["chunks"] > 0
    assert copied["loss"]["true"] < 0.3 * copied["loss"]["random"], copied
    assert none["loss"]["true"] > 0.7 * none["loss"]["random"], none
