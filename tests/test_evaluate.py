"""The one evaluation function: three modes, token weighting, random-neighbor draws, overlap buckets."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from data_prep.corpora import stdlib_docstrings, write_corpus
from data_prep.pipeline import main as prepare
from retro_dist.cli import main as cli_main
from retro_dist.data.format import Layout, load_manifest, load_npy
from retro_dist.evaluate import (BUCKET_EDGES, Evaluator, format_report, gain, longest_common_run,
                                 random_neighbor_ids)
from retro_dist.model import RETRO
from retro_dist.model.presets import preset_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    corpus = write_corpus(root / "corpus", stdlib_docstrings(150))
    assert prepare(["--input", str(corpus), "--out", str(root / "ds"), "--vocab-size", "400", "--chunk-size", "16",
                    "--seq-len", "64", "--embedder", "hash-64", "--num-neighbors", "2", "--shard-samples", "5",
                    "--val-fraction", "0.15"]) == 0
    return root / "ds"


def tiny_model(dataset) -> RETRO:
    m = load_manifest(dataset)
    torch.manual_seed(0)
    return RETRO(preset_config("tiny", num_tokens=m["vocab_size"], max_seq_len=m["seq_len"],
                               chunk_size=m["chunk_size"], pad_id=m["pad_id"])).eval()


def test_longest_common_run():
    a = np.array([[5, 6, 7, 8], [5, 6, 7, 8], [0, 0, 0, 0]])
    b = np.array([[[9, 5, 6, 7], [8, 8, 8, 8]],      # run 5 6 7 in the first neighbor
                  [[6, 7, 1, 1], [7, 8, 5, 6]],      # runs of 2, and never across neighbors
                  [[0, 0, 0, 0], [0, 0, 0, 0]]])     # padding never matches
    assert longest_common_run(a, b, pad_id=0).tolist() == [3, 2, 0]


def test_random_neighbors_are_seeded_by_sample_and_keep_missing():
    ids = np.array([[3, -1], [4, 5]])
    one = random_neighbor_ids(ids, 7, num_db_chunks=1000, seed=0)
    assert (one == random_neighbor_ids(ids, 7, num_db_chunks=1000, seed=0)).all()
    assert (one != random_neighbor_ids(ids, 8, num_db_chunks=1000, seed=0)).any()
    assert one[0, 1] == -1 and ((one >= 0) & (one < 1000)).sum() == 3


def test_gain_is_one_formula():
    assert gain(1.0, 1.0) == 0.0
    assert gain(2.0, 2.0 + math.log(2)) == pytest.approx(0.5)  # half the perplexity


def test_world_size_and_batch_size_do_not_change_the_figures(dataset):
    model = tiny_model(dataset)
    whole = Evaluator(str(dataset), batch_size=3).run(model)
    # three ranks, summed the way all_reduce sums them
    parts = [Evaluator(str(dataset), batch_size=2, rank=rank, world_size=3) for rank in range(3)]
    assert sum(len(p.samples) for p in parts) == parts[0].num_samples
    assert len({p.num_batches for p in parts}) == 1  # every rank runs the same number of forwards
    sums = []
    for p in parts:
        captured = {}
        p.run(model, all_reduce=lambda t: captured.setdefault("t", t.clone()))
        sums.append(captured["t"])
    total = torch.stack(sums).sum(0)
    from retro_dist.evaluate import MODES, Totals, summarize
    merged = summarize(Totals.from_flat(total.numpy(), MODES, len(BUCKET_EDGES) - 1))
    assert merged["tokens"] == whole["tokens"]
    for mode in MODES:
        assert merged["loss"][mode] == pytest.approx(whole["loss"][mode], rel=1e-6)
    assert [b["chunks"] for b in merged["overlap_buckets"]] == [b["chunks"] for b in whole["overlap_buckets"]]


def test_token_weighted_over_every_sample(dataset):
    model = tiny_model(dataset)
    r = Evaluator(str(dataset), batch_size=4).run(model, modes=("true",))
    manifest = load_manifest(dataset)
    samples = sum(s["samples"] for s in manifest["shards"]["val"])
    # the plain per-sample mean loss, weighted by each sample's label count, over every val sample
    losses, weights = [], []
    one_by_one = Evaluator(str(dataset), batch_size=1)
    for batch in one_by_one.batches():
        tokens = torch.from_numpy(batch.tokens)
        retrieved = one_by_one.retrieved(batch, "true")
        with torch.no_grad():
            losses.append(model(tokens, retrieved, return_loss=True).item())
        weights.append(int((tokens[:, 1:] != manifest["pad_id"]).sum()))
    assert len(losses) == samples > 5  # every sample, the last partial batch too
    assert r["tokens"] == sum(weights)
    assert r["loss"]["true"] == pytest.approx(np.average(losses, weights=weights), rel=1e-5)


def test_random_equals_off_when_cross_attention_is_zeroed(dataset):
    """With the chunked cross-attention's output projection zeroed, neighbors cannot reach the logits: random
    neighbors, true neighbors and retrieval off must give the same loss. A random-neighbor draw that leaked true
    neighbors, or an `off` mode that still read neighbors, would show here only together with the next test."""
    model = tiny_model(dataset)
    for block in model.decoder.blocks:
        if block.cross_attn is not None:
            torch.nn.init.zeros_(block.cross_attn.fn.attn.to_out.weight)
            torch.nn.init.zeros_(block.cross_attn.fn.attn.to_out.bias)
    r = Evaluator(str(dataset)).run(model)
    assert r["loss"]["random"] == pytest.approx(r["loss"]["off"], abs=1e-6)
    assert r["loss"]["true"] == pytest.approx(r["loss"]["off"], abs=1e-6)
    assert r["gain_vs_random"] == pytest.approx(0.0, abs=1e-6)


def test_random_neighbors_are_other_chunks_than_true(dataset):
    model = tiny_model(dataset)  # untrained, but its cross-attention reads what it is given
    ev = Evaluator(str(dataset))
    batch = next(ev.batches())
    assert not torch.equal(ev.retrieved(batch, "true"), ev.retrieved(batch, "random"))
    r = ev.run(model)
    assert r["loss"]["random"] != r["loss"]["true"]


def test_overlap_buckets_count_every_window(dataset):
    ev = Evaluator(str(dataset))
    r = ev.run(tiny_model(dataset))
    windows = sum(len(s[2]) for s in ev.samples)
    assert sum(b["chunks"] for b in r["overlap_buckets"]) == windows
    db = load_npy(Layout(dataset).chunks("train"))
    # a window's overlap, recomputed by brute force for the first sample
    index, tokens, ids = ev.samples[0]
    overlap, _ = ev.overlaps(next(ev.batches()))
    cs = ev.chunk_size
    for i in range(len(ids)):
        target = [t for t in tokens[(i + 1) * cs:(i + 2) * cs] if t != ev.pad_id]
        best = 0
        for j in ids[i]:
            if j < 0:
                continue
            n = list(db[j]) + (list(db[j + 1]) if j + 1 < len(db) else [])
            for a in range(len(target)):
                for b in range(len(n)):
                    k = 0
                    while a + k < len(target) and b + k < len(n) and target[a + k] == n[b + k]:
                        k += 1
                    best = max(best, k)
        assert overlap[0, i] == pytest.approx(best / max(1, len(target)))
    text = format_report(r)
    assert "random neighbors" in text and "loss by overlap" in text


def test_eval_and_generate_refuse_another_tokenizer_alike(dataset, tmp_path, capsys):
    """A dataset tokenized by another tokenizer, of the same vocabulary size or a smaller one, passes the manifest
    check (ids stay below num_tokens) but its ids mean other words to the model: eval printed perplexities for it
    while generate refused. Both refuse now, with the same line."""
    model_dir = tmp_path / "model"
    tiny_model(dataset).save_pretrained(model_dir)
    data = json.loads(Layout(dataset).tokenizer.read_text())
    vocab = data["model"]["vocab"]
    first, second = list(vocab)[10:12]  # another tokenizer of the same size: two ids swapped
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (model_dir / "tokenizer.json").write_text(json.dumps(data))

    corpus = write_corpus(tmp_path / "corpus", stdlib_docstrings(60))
    smaller = tmp_path / "smaller"  # its own tokenizer of 300 tokens, the model has 400
    assert prepare(["--input", str(corpus), "--out", str(smaller), "--vocab-size", "300", "--chunk-size", "16",
                    "--seq-len", "64", "--embedder", "hash-64", "--num-neighbors", "2"]) == 0
    assert load_manifest(smaller)["vocab_size"] < load_manifest(dataset)["vocab_size"]
    capsys.readouterr()  # prepare's progress lines
    for data_dir, model in ((dataset, model_dir), (smaller, model_dir), (smaller, model_dir.with_name("same"))):
        if model.name == "same":  # the model's own tokenizer, a smaller vocabulary in the dataset
            shutil.copytree(model_dir, model)
            shutil.copy(Layout(dataset).tokenizer, model / "tokenizer.json")
        errors = []
        for command, extra in (("eval", []), ("generate", ["--prompt", "Return the"])):
            code = cli_main([command, "--model", str(model), "--dataset", str(data_dir), *extra])
            out, err = capsys.readouterr()
            assert code == 2 and err.count("\n") == 1 and not out, (command, out, err)
            errors.append(err.removeprefix(f"retro-dist {command}: error: "))
        assert errors[0] == errors[1], errors
        assert f"the model's tokenizer ({model / 'tokenizer.json'}) differs from the dataset's" in errors[0]
