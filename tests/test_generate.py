"""Retrieval-augmented generation: the cache equals full recompute, retrieval once per chunk, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.corpora import stdlib_docstrings, write_corpus
from data_prep.pipeline import main as prepare
from retro_dist import RETRO, RetroConfig
from retro_dist.data.format import Layout, load_manifest
from retro_dist.cli import main as cli_main
from retro_dist.compat import check_same_tokenizer
from retro_dist.generate import Retriever, generate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    corpus = write_corpus(root / "corpus", stdlib_docstrings(200))
    assert prepare(["--input", str(corpus), "--out", str(root / "ds"), "--vocab-size", "400", "--chunk-size", "16",
                    "--seq-len", "64", "--embedder", "hash-64", "--num-neighbors", "2"]) == 0
    return root / "ds"


@pytest.fixture(scope="module")
def model_dir(dataset, tmp_path_factory):
    m = load_manifest(dataset)
    torch.manual_seed(0)
    model = RETRO(RetroConfig(num_tokens=m["vocab_size"], max_seq_len=128, enc_dim=32, enc_depth=2, dec_dim=64,
                              dec_depth=3, dec_cross_attn_layers=(2, 3), heads=4, dim_head=32, chunk_size=16))
    out = tmp_path_factory.mktemp("model")
    model.save_pretrained(out)
    shutil.copy(Layout(dataset).tokenizer, out / "tokenizer.json")
    return out


def test_cache_equals_full_recompute(dataset, model_dir):
    model = RETRO.from_pretrained(model_dir)
    prompt = list(range(5, 25))  # 20 tokens: the first chunk completes inside the prompt
    cached = generate(model, Retriever(dataset), prompt, max_new_tokens=70)
    full = generate(model, Retriever(dataset), prompt, max_new_tokens=70, use_cache=False)
    assert cached.tokens == full.tokens and len(cached.tokens) == 90
    assert [list(a) for a in cached.neighbor_ids] == [list(a) for a in full.neighbor_ids]


def test_retrieval_once_per_completed_chunk(dataset, model_dir):
    retriever = Retriever(dataset)
    out = generate(RETRO.from_pretrained(model_dir), retriever, [7] * 3, max_new_tokens=60)
    assert retriever.calls == len(out.tokens) // 16 == len(out.neighbor_ids) == 3


def test_sampling_is_seeded_and_top_k_one_is_greedy(dataset, model_dir):
    model, retriever = RETRO.from_pretrained(model_dir), Retriever(dataset)
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_p=0.9)
    a = generate(model, retriever, [3, 4, 5], seed=1, **kwargs).tokens
    assert a == generate(model, retriever, [3, 4, 5], seed=1, **kwargs).tokens
    assert a != generate(model, retriever, [3, 4, 5], seed=2, **kwargs).tokens
    greedy = generate(model, retriever, [3, 4, 5], max_new_tokens=20).tokens
    assert generate(model, retriever, [3, 4, 5], max_new_tokens=20, temperature=0.7, top_k=1).tokens == greedy


def test_bad_requests(dataset, model_dir, tmp_path):
    model, retriever = RETRO.from_pretrained(model_dir), Retriever(dataset)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, retriever, [])
    with pytest.raises(ValueError, match="more than max_seq_len=128"):
        generate(model, retriever, [5] * 129)
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    data = json.loads((other / "tokenizer.json").read_text())
    first, second = list(data["model"]["vocab"])[10:12]  # another tokenizer: two ids swapped
    vocab = data["model"]["vocab"]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="differs from the dataset's"):
        check_same_tokenizer(other, dataset)


def test_cli_shows_neighbors(dataset, model_dir):
    exe = Path(sys.executable).parent / "retro-dist"
    result = subprocess.run([str(exe), "generate", "--model", str(model_dir), "--dataset", str(dataset), "--prompt",
                             "Return the number of items in the container.", "--max-new-tokens", "24"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "continuation:" in result.stdout and "retrieved:" in result.stdout and "#" in result.stdout
    empty = subprocess.run([str(exe), "generate", "--model", str(model_dir), "--dataset", str(dataset), "--prompt", ""],
                           capture_output=True, text=True, timeout=300)
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1 and "prompt is empty" in empty.stderr


@pytest.mark.parametrize("option, value, message", [
    ("--top-k", "-1", "top_k=-1 must be 0 (no top-k filter) or a positive number of tokens"),
    ("--temperature", "-1", "temperature=-1.0 must be 0 (greedy) or positive"),
    ("--temperature", "nan", "temperature=nan must be 0 (greedy) or positive"),
    ("--top-p", "0", "top_p=0.0 must lie in (0, 1]"),
    ("--top-p", "1.5", "top_p=1.5 must lie in (0, 1]"),
])
def test_cli_refuses_sampling_settings_out_of_range(dataset, model_dir, option, value, message, capsys):
    """`--top-k -1` was a traceback from torch.topk (with a temperature) and `--temperature -1` was taken as greedy."""
    code = cli_main(["generate", "--model", str(model_dir), "--dataset", str(dataset), "--prompt", "Return the",
                     "--temperature", "0.8", option, value])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and not out, err
    assert err.startswith(f"retro-dist generate: error: {message}")
