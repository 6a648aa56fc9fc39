"""Half precision: rotary angles stay fp32 in a bf16 model, fp16 keeps gradients and masks finite, and a tiny
fp16 training run through the real DeepSpeed engine follows the fp32 one."""

from __future__ import annotations

import pytest
import torch

from retro_dist import RETRO, RetroConfig
from retro_dist.model.layers import LogitsHead, attention, key_padding_bias

CONFIG = RetroConfig(num_tokens=128, max_seq_len=128, enc_dim=64, enc_depth=2, dec_dim=64, dec_depth=3,
                     dec_cross_attn_layers=(1, 3), heads=4, dim_head=32, chunk_size=8)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# rotary ----------------------------------------------------------------------------------------------------------

def test_rotary_is_fp32_in_a_bf16_model(tmp_path):
    """bf16 holds 8 bits of mantissa: positions above 256 collide there, so angles are computed in fp32 whatever
    the model was cast to (`.to(bf16)`, `from_pretrained(dtype=bf16)`, an engine that casts buffers)."""
    positions = torch.arange(2048)
    ref_cos, ref_sin = RETRO(CONFIG).rotary(positions)
    RETRO(CONFIG).save_pretrained(tmp_path)
    for model in (RETRO(CONFIG).to(torch.bfloat16), RETRO.from_pretrained(tmp_path, dtype=torch.bfloat16)):
        cos, sin = model.rotary(positions)
        assert cos.dtype == sin.dtype == torch.float32
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-5)
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-5)
        assert not torch.equal(cos[257], cos[256])  # neighbours that bf16 positions would merge


# fp16 -----------------------------------------------------------------------------------------------------------

LOSS_SCALE = 2.0 ** 16  # DeepSpeed's initial fp16 loss scale (initial_scale_power 16)


@pytest.mark.parametrize("mode", ["fp16 weights", "fp16 autocast"])
def test_fused_loss_gradient_survives_fp16(mode):
    """The head's gradient per token is (softmax - onehot) / tokens: with 16384 tokens most of it lies below fp16's
    smallest subnormal (6e-8) until the loss scale multiplies it, so it stays fp32 until then. Labels take 16 ids
    only: the other rows of the weight gradient are made of those small softmax terms alone."""
    tokens, vocab = 16384, 512
    head = LogitsHead(64, vocab)
    x = torch.randn(tokens, 64)
    labels = torch.randint(0, 16, (tokens,))
    ref = LogitsHead(64, vocab).double()
    ref.load_state_dict(head.state_dict())
    x_ref = x.double().requires_grad_()
    ref(x_ref, labels).backward()

    if mode == "fp16 weights":  # DeepSpeed's fp16: the module itself is half
        head, x = head.half(), x.half()
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16, enabled=mode == "fp16 autocast"):
        loss = head(x, labels)
    (loss * LOSS_SCALE).backward()
    grads = {"x": (x.grad, x_ref.grad), "weight": (head.weight.grad, ref.weight.grad),
             "unlabelled weight rows": (head.weight.grad[16:], ref.weight.grad[16:]),
             "bias": (head.bias.grad, ref.bias.grad)}
    for name, (got, want) in grads.items():
        assert torch.isfinite(got).all(), name
        got = got.double() / LOSS_SCALE
        assert ((got - want).norm() / want.norm()).item() < 5e-3, name


def test_fused_loss_gradient_blocks_stay_in_fp16_range():
    """A block's weight gradient sums its rows' (softmax - onehot) * x in fp16: 20000 rows of the same label with
    x = 8 sum to 1.6e5 (> 65504) in one block of a small vocabulary; fp16 blocks hold few enough rows to stay finite."""
    head = LogitsHead(32, 64)
    x = torch.full((20000, 32), 8.0)
    labels = torch.zeros(20000, dtype=torch.long)
    ref = LogitsHead(32, 64).double()
    ref.load_state_dict(head.state_dict())
    ref(x.double(), labels).backward()
    head = head.half()
    scale = 1024.0  # a scale the true gradient (about 8) fits in, as the dynamic loss scaler would settle on
    (head(x.half(), labels) * scale).backward()
    got = head.weight.grad.double() / scale
    assert torch.isfinite(got).all()
    assert ((got - ref.weight.grad).norm() / ref.weight.grad.norm()).item() < 5e-3


def test_attention_mask_stays_finite_in_fp16():
    """A fully masked row (a neighbor that is all padding) with strongly negative scores: mask value + score must
    not overflow fp16 to -inf (a row of -inf is NaN after softmax), whether the bias is built in fp16 or fp32."""
    q = torch.full((2, 1, 4, 32), 1.0, dtype=torch.float16)
    k = torch.full((2, 1, 6, 32), -8.0, dtype=torch.float16)  # scores -45 everywhere
    v = torch.randn(2, 1, 6, 32).half()
    keep = torch.tensor([[True, True, False, False, True, True], [False] * 6])
    for bias_dtype in (torch.float16, torch.float32):
        out = attention(q, k, v, bias=key_padding_bias(keep, bias_dtype))
        assert torch.isfinite(out).all(), bias_dtype
        expected = v[0, :, [0, 1, 4, 5]].float().mean(dim=-2)  # equal scores: the mean of the kept values
        torch.testing.assert_close(out[0].float(), expected.expand_as(out[0]), rtol=0, atol=2e-3)


@pytest.mark.parametrize("mode", ["fp16 weights", "fp16 autocast"])
def test_all_pad_neighbor_in_fp16(mode):
    """A chunk whose neighbors are all padding gives finite logits in fp16, close to fp32's."""
    model = RETRO(CONFIG).eval()
    seq, retrieved = torch.randint(1, 128, (2, 64)), torch.randint(1, 128, (2, 8, 2, 16))
    retrieved[0, 1] = 0  # every neighbor of one chunk is padding
    retrieved[1, 2, 0] = 0  # one neighbor of another
    with torch.no_grad():
        ref = model(seq, retrieved)
        if mode == "fp16 weights":
            logits = model.half()(seq, retrieved)
        else:
            with torch.autocast("cpu", dtype=torch.float16):
                logits = model(seq, retrieved)
    assert torch.isfinite(logits).all()
    assert rel_err(logits.float(), ref) < 2e-2


# fp16 training ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fp16_training_follows_fp32(tmp_path):
    """The tiny preset, 10 steps through the real DeepSpeed engine (ZeRO 2, its fp16 loss scaler from 2^16) on CPU,
    against fp32 from the same start. fp16 rounds to 2^-11 relative (5e-4): on a loss near 6 that is 3e-3 per
    rounding, and the per-token losses average theirs out; 5e-3 per step leaves that margin (measured: 1e-4).
    A skipped step (an overflow) or a lost gradient shifts the curve by 0.1 and more."""
    from tests.train_helpers import losses, tiny_args, tiny_dataset, train

    dataset = tiny_dataset(tmp_path / "data")
    curves = {}
    for precision in ("fp32", "fp16"):
        result = train(1, tiny_args(dataset, tmp_path / precision, "--train.steps=10", "--train.zero_stage=2",
                                    f"--train.precision={precision}", "--logging.val_every=100",
                                    "--checkpoint.every=100"), timeout=900)  # minutes on a loaded 2-core box
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        curves[precision] = losses(result.stdout)
    assert sorted(curves["fp16"]) == sorted(curves["fp32"]) == list(range(1, 11))
    for step, loss in curves["fp32"].items():
        assert curves["fp16"][step] == pytest.approx(loss, abs=5e-3), step
