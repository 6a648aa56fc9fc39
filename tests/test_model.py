"""Unit tests of the model: causality, save/load and config round trips, clear errors on bad input."""

import json

import pytest
import torch

from retro_dist import RETRO, RetroConfig

CONFIG = RetroConfig(num_tokens=128, max_seq_len=128, enc_dim=64, enc_depth=2, dec_dim=64, dec_depth=3,
                     dec_cross_attn_layers=(1, 3), heads=4, dim_head=32, chunk_size=8)


@pytest.fixture
def model():
    return RETRO(CONFIG).eval()


def inputs(n=64, r=2, m=16):
    return torch.randint(1, 128, (2, n)), torch.randint(1, 128, (2, n // 8, r, m))


@pytest.mark.parametrize("i", [0, 6, 7, 8, 30, 31, 62])
def test_causal(model, i):
    """Changing tokens after position i, or the neighbors of chunks that end after i, changes no logit at <= i."""
    seq, retrieved = inputs()
    later_seq, later_retrieved = seq.clone(), retrieved.clone()
    later_seq[:, i + 1:] = torch.randint(1, 128, later_seq[:, i + 1:].shape)
    first_unseen = next(c for c in range(retrieved.shape[1] + 1) if c == retrieved.shape[1] or (c + 1) * 8 - 1 > i)
    later_retrieved[:, first_unseen:] = torch.randint(1, 128, later_retrieved[:, first_unseen:].shape)
    with torch.no_grad():
        before, after = model(seq, retrieved), model(later_seq, later_retrieved)
    torch.testing.assert_close(after[:, : i + 1], before[:, : i + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(after[:, i + 1:], before[:, i + 1:], atol=1e-3)


@pytest.mark.parametrize("chunk", [0, 3])
def test_neighbors_reach_the_chunk_end_and_no_earlier(model, chunk):
    """Chunk c's neighbors are first read at its last token, (c + 1) * chunk_size - 1."""
    seq, retrieved = inputs()
    changed = retrieved.clone()
    changed[:, chunk] = torch.randint(1, 128, changed[:, chunk].shape)
    with torch.no_grad():
        before, after = model(seq, retrieved), model(seq, changed)
    end = (chunk + 1) * 8 - 1
    torch.testing.assert_close(after[:, :end], before[:, :end], rtol=0, atol=1e-5)
    assert not torch.allclose(after[:, end], before[:, end], atol=1e-4)


def test_pad_tokens_are_masked(model):
    """A neighbor that is all padding contributes nothing: same logits as a different all-pad neighbor layout."""
    seq, retrieved = inputs()
    retrieved[:, :, 1] = 0
    other = retrieved.clone()
    other[:, :, 1, 3] = 0  # already pad: no change
    with torch.no_grad():
        base = model(seq, retrieved)
        torch.testing.assert_close(model(seq, other), base)
        # dropping the padded neighbor altogether gives the same logits: it was fully masked
        torch.testing.assert_close(model(seq, retrieved[:, :, :1]), base, rtol=0, atol=1e-5)


def test_save_and_load_pretrained(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = RETRO.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    seq, retrieved = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(seq, retrieved), model(seq, retrieved))
    half = RETRO.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_from_pretrained_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(CONFIG.to_json())
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        RETRO.from_pretrained(tmp_path)


def test_config_json_round_trip(tmp_path):
    config = RetroConfig(enc_cross_attn_layers=(1,), dec_cross_attn_layers=None, use_deepnet=True,
                         enc_scale_residual=0.5)
    assert RetroConfig.from_json(config.to_json()) == config
    config.save(tmp_path / "c.json")
    assert RetroConfig.load(tmp_path / "c.json") == config
    assert json.loads(config.to_json())["enc_cross_attn_layers"] == [1]


def test_defaults_are_retro_pytorchs(retro_pytorch):
    import inspect
    params = inspect.signature(retro_pytorch.RETRO.__init__).parameters
    ours = RetroConfig().to_dict()
    assert ours.pop("cca_positions") == "aligned"  # ours alone: RETRO-pytorch's positions stop copying (docs/reading-neighbors.md)
    for name, value in ours.items():
        expected = params[name].default
        assert value == (list(expected) if isinstance(expected, tuple) else expected), name
    assert set(params) - set(ours) == {"self", "norm_klass"}


def test_cca_positions_default_and_legacy_configs():
    assert RetroConfig().cca_positions == "aligned"
    legacy = CONFIG.to_dict()
    del legacy["cca_positions"]  # a config.json written before the field existed was trained with the old positions
    assert RetroConfig.from_dict(legacy).cca_positions == "retro-pytorch"
    assert RetroConfig.from_json(CONFIG.to_json()).cca_positions == CONFIG.cca_positions
    with pytest.raises(ValueError, match="cca_positions='shifted' must be one of"):
        RetroConfig(cca_positions="shifted")


@pytest.mark.parametrize("mode, expected", [("aligned", list(range(7, 15))), ("retro-pytorch", [14] + [0] * 7)])
def test_cca_query_positions(mode, expected):
    """Window row t (the position that predicts the (t+1)-th token after the chunk) sits at chunk_size - 1 + t in
    the neighbor's coordinates when aligned; RETRO-pytorch's shifted table puts row 0 at 2cs - 2, the rest at 0."""
    model = RETRO(RetroConfig(**{**CONFIG.to_dict(), "cca_positions": mode}))
    inputs = model._retrieval_inputs(torch.ones(1, 2, 2, 16, dtype=torch.long), dtype=torch.float32)
    torch.testing.assert_close(inputs.cca_q_rope, model.rotary(torch.tensor(expected)))


@pytest.mark.parametrize("change, message", [
    (dict(dim_head=16), "dim_head must be at least 32"),
    (dict(dec_cross_attn_layers=(1, 4)), r"dec_cross_attn_layers has layers \[4\] outside 1..dec_depth=3"),
    (dict(enc_cross_attn_layers=(0,)), "enc_cross_attn_layers has layers"),
    (dict(pad_id=128), "pad_id=128"),
    (dict(chunk_size=0), "chunk_size must be a positive integer"),
    (dict(dec_attn_dropout=1.0), "dec_attn_dropout"),
])
def test_bad_config(change, message):
    with pytest.raises(ValueError, match=message):
        RetroConfig(**{**CONFIG.to_dict(), **change})
    with pytest.raises(ValueError, match="unknown RetroConfig fields"):
        RetroConfig.from_dict({"num_tokenz": 3})


@pytest.mark.parametrize("make, error, message", [
    (lambda s, r: (s, r[0, 0]), ValueError, "retrieved must be"),
    (lambda s, r: (s, r[0]), ValueError, "retrieved has batch size 8 but seq has 2"),
    (lambda s, r: (s, r[..., None]), ValueError, "retrieved must be"),
    (lambda s, r: (s, r[:, :5]), ValueError, "needs 8 chunks, got 5"),
    (lambda s, r: (s, r[..., :7]), ValueError, "fewer than chunk_size=8"),
    (lambda s, r: (torch.randint(1, 128, (2, 129)), None), ValueError, "exceeds max_seq_len=128"),
    (lambda s, r: (s, r[:1]), ValueError, "batch size 1"),
    (lambda s, r: (s.clone().fill_(128), r), ValueError, r"seq holds token ids in \[128, 128\]"),
    (lambda s, r: (s, r.clone().fill_(-1)), ValueError, "-1 neighbor ids"),
    (lambda s, r: (s.float(), r), TypeError, "integer token ids"),
])
def test_bad_input(model, make, error, message):
    seq, retrieved = make(*inputs())
    with pytest.raises(error, match=message):
        model(seq, retrieved)


def test_return_loss_length(model):
    with pytest.raises(ValueError, match="exceeds max_seq_len=128 .seq holds one extra label token"):
        model(torch.randint(1, 128, (1, 130)), return_loss=True)
    assert model(torch.randint(1, 128, (1, 129)), return_loss=True).ndim == 0


def test_pad_labels_are_ignored(model):
    seq, retrieved = inputs(n=64)
    seq = torch.cat([seq, torch.zeros(2, 1, dtype=torch.long)], dim=1)
    padded = seq.clone()
    padded[:, -9:] = 0  # padding at the end: those labels must not count
    with torch.no_grad():
        loss = model(padded, retrieved, return_loss=True)
        logits = model(padded[:, :-1], retrieved)
    keep = padded[:, 1:] != 0
    expected = torch.nn.functional.cross_entropy(logits[keep], padded[:, 1:][keep])
    torch.testing.assert_close(loss, expected)


def test_dropout_only_in_training():
    config = RetroConfig(**{**CONFIG.to_dict(), "dec_attn_dropout": 0.5, "dec_ff_dropout": 0.5,
                            "enc_attn_dropout": 0.5, "enc_ff_dropout": 0.5})
    model = RETRO(config)
    seq, retrieved = inputs()
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(seq, retrieved), model(seq, retrieved))
        model.train()
        assert not torch.equal(model(seq, retrieved), model(seq, retrieved))


@pytest.mark.parametrize("block_elements", [128 * 7, 1 << 24])
def test_blockwise_loss_equals_cross_entropy(block_elements, monkeypatch):
    """The output head's blockwise loss and its precomputed gradients equal F.cross_entropy on full logits."""
    from retro_dist.model.layers import LogitsHead
    monkeypatch.setattr(LogitsHead, "block_elements", block_elements)  # 7 rows per block: many blocks, a ragged end
    head = LogitsHead(32, 128)
    x = torch.randn(3, 20, 32, requires_grad=True)
    labels = torch.randint(0, 128, (3, 20))
    labels[0, :5] = 0
    loss = head(x, labels, ignore_index=0)
    (2.5 * loss).backward()
    grads = [t.grad.clone() for t in (x, head.weight, head.bias)]
    for t in (x, head.weight, head.bias):
        t.grad = None
    expected = torch.nn.functional.cross_entropy(head(x).flatten(0, 1), labels.flatten(), ignore_index=0)
    (2.5 * expected).backward()
    torch.testing.assert_close(loss, expected)
    for got, t in zip(grads, (x, head.weight, head.bias)):
        torch.testing.assert_close(got, t.grad)
    with torch.no_grad():
        torch.testing.assert_close(head(x, labels, ignore_index=0), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(head(x, labels, ignore_index=0), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("extra", [{}, {"use_deepnet": True}, {"gated_rmsnorm": True, "dec_cross_attn_layers": None},
                                   {"cca_positions": "retro-pytorch"}])
def test_decode_step_equals_full_forward(extra):
    """The KV cache + per-chunk encoding gives the last row of a full forward at every position."""
    config = RetroConfig(**{**CONFIG.to_dict(), "max_seq_len": 64, **extra})
    model = RETRO(config).eval()
    seq, retrieved = torch.randint(1, 128, (2, 50)), torch.randint(0, 128, (2, 6, 2, 16))
    retrieved[0, 1, 1] = 0  # an all-pad neighbor
    cache = model.new_cache()
    for p in range(50):
        step = model.decode_step(seq[:, p], cache, retrieved[:, p // 8] if (p + 1) % 8 == 0 else None)
        with torch.no_grad():
            full = model(seq[:, :p + 1], retrieved[:, :(p + 1) // 8])[:, -1]
        torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pass neighbors exactly when it does"):
        model.decode_step(seq[:, 0], cache, retrieved[:, 0])


@pytest.mark.parametrize("make, error, message", [
    (lambda s, r: (s.clone().fill_(128), r), ValueError, r"seq holds token ids in \[128, 128\]"),
    (lambda s, r: (s, r.clone().fill_(-1)), ValueError, r"retrieved holds token ids in \[-1, -1\].*-1 neighbor ids"),
    (lambda s, r: (s, r.float()), TypeError, "retrieved must hold integer token ids"),
])
def test_check_inputs(model, make, error, message):
    """The check the trainer runs on the CPU batch before the copy: the same one line as forward's."""
    seq, retrieved = make(*inputs())
    with pytest.raises(error, match=message):
        model.check_inputs(seq, retrieved)
    with pytest.raises(error, match=message):
        model(seq, retrieved)  # a CPU forward still checks by itself
    model.check_inputs(*inputs())
    model.check_inputs(inputs()[0], None)


def test_forward_off_the_cpu_never_reads_values_back(model, monkeypatch):
    """On an accelerator the range check is a host sync per tensor per forward: it is skipped there (check_inputs
    runs on the CPU batch instead). The meta device stands in for one: any read of a value back to the host raises
    there, so forward, backward and decoding on meta tensors prove that none happens; a count of tolist/item calls
    says the same."""
    reads = []
    for name in ("tolist", "item"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _o=original, **k: (reads.append(t.device), _o(t, *a, **k))[1])
    meta = RETRO(CONFIG).to("meta").train()
    seq, retrieved = (t.to("meta") for t in inputs(n=64))
    loss = meta(torch.cat([seq, seq[:, :1]], dim=1), retrieved, return_loss=True)
    loss.backward()
    assert loss.device.type == "meta" and meta.to_logits.weight.grad is not None
    cache = meta.new_cache()
    for p in range(8):
        meta.decode_step(seq[:, p], cache, retrieved[:, 0] if p == 7 else None)
    assert reads == []
    model(*inputs())
    assert reads == [torch.device("cpu")] * 2  # on CPU: seq's and retrieved's range, one read each
