"""GPU paths CPU-only development must not break: CUDA forward/backward, bf16 autocast, fused attention, nccl."""

from __future__ import annotations

import pytest
import torch

from retro_dist import RETRO, RetroConfig
from tests.train_helpers import losses, tiny_args, train

pytestmark = pytest.mark.gpu
CONFIG = RetroConfig(num_tokens=256, max_seq_len=256, enc_dim=64, enc_depth=2, dec_dim=128, dec_depth=4,
                     dec_cross_attn_layers=(2, 4), heads=4, dim_head=32, chunk_size=16)


def test_cuda_matches_cpu():
    torch.manual_seed(0)
    model = RETRO(CONFIG).eval()
    seq, retrieved = torch.randint(1, 256, (2, 129)), torch.randint(0, 256, (2, 8, 2, 32))
    with torch.no_grad():
        cpu = model(seq[:, :-1], retrieved)
        gpu = model.cuda()(seq[:, :-1].cuda(), retrieved.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


def test_cuda_bf16_training_step():
    model = RETRO(CONFIG).cuda()
    seq, retrieved = torch.randint(1, 256, (2, 129)).cuda(), torch.randint(0, 256, (2, 8, 2, 32)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(seq, retrieved, return_loss=True)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_nccl_training_run(tmp_path):
    from data_prep.corpora import stdlib_docstrings, write_corpus
    from data_prep.pipeline import main as prepare
    corpus = write_corpus(tmp_path / "corpus", stdlib_docstrings(300))
    dataset = tmp_path / "ds"
    assert prepare(["--input", str(corpus), "--out", str(dataset), "--vocab-size", "512", "--chunk-size", "16",
                    "--seq-len", "64", "--embedder", "hash-64", "--num-neighbors", "2"]) == 0
    args = [a for a in tiny_args(dataset, tmp_path / "run", "--train.steps=6") if "precision" not in a]
    result = train(1, args + ["--train.precision=bf16"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cuda rank(s)" in result.stdout and len(losses(result.stdout)) == 6
