"""`retro-dist neighbors` on a real dataset: ids, texts and similarities match the arrays; bad input is one line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_prep.corpora import stdlib_docstrings, write_corpus
from data_prep.pipeline import main as prepare
from retro_dist.cli import main
from retro_dist.data.format import Layout, load_manifest, save_manifest
from retro_dist.inspect_neighbors import BOUNDARY, one_line

K = 3  # neighbors per chunk


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("neighbors")
    corpus = write_corpus(root / "corpus", stdlib_docstrings(120))
    assert prepare(["--input", str(corpus), "--out", str(root / "ds"), "--vocab-size", "400", "--chunk-size", "16",
                    "--seq-len", "64", "--embedder", "hash-64", "--num-neighbors", str(K),
                    "--val-fraction", "0.1"]) == 0
    return root / "ds"


def run(capsys, *args) -> str:
    assert main(["neighbors", *map(str, args)]) == 0
    return capsys.readouterr().out


def report(capsys, dataset, *args) -> dict:
    return json.loads(run(capsys, "--dataset", dataset, "--json", *args))


def decode(dataset, ids) -> str:
    """The tokenizer's text of db chunk ids, pad dropped (the inspector's rule), read without the inspector."""
    tok, pad = Tokenizer.from_file(str(Layout(dataset).tokenizer)), load_manifest(dataset)["pad_id"]
    return tok.decode([int(t) for t in ids if t != pad], skip_special_tokens=False)


def test_printed_ids_are_the_neighbors_rows(dataset, capsys):
    rows = np.load(Layout(dataset).neighbors("val"))
    out = run(capsys, "--dataset", dataset, "--split", "val", "--sample", 2)
    printed = [int(j) if j else -1 for j in re.findall(r"^  #\d+  (?:db (\d+)|none)", out, re.M)]
    np.testing.assert_array_equal(np.reshape(printed, (-1, K)), rows[8:12])  # sample 2 = chunks 8..11
    assert re.findall(r"^chunk (\d+) · sample 2 ", out, re.M) == ["8", "9", "10", "11"]
    assert [n["id"] for c in report(capsys, dataset, "--sample", 2)["chunks"] for n in c["neighbors"]] == \
        rows[8:12].reshape(-1).tolist()


def test_neighbor_text_is_chunk_and_continuation(dataset, capsys):
    db = np.load(Layout(dataset).chunks("train"))
    chunk = report(capsys, dataset, "--chunk", 5)["chunks"][0]
    out = run(capsys, "--dataset", dataset, "--chunk", 5, "--width", 0)
    for n in chunk["neighbors"]:
        j = n["id"]
        assert n["text"] == decode(dataset, db[j]) and n["continuation"] == decode(dataset, db[j + 1])
        assert f"\n      {one_line(n['text'] + BOUNDARY + n['continuation'], 0)}\n" in out
    assert max(map(len, run(capsys, "--dataset", dataset, "--chunk", 5, "--width", 20).splitlines()[2::2])) <= 26

    last = len(db) - 1  # past the last chunk the continuation is empty; a db chunk needs no neighbors
    assert report(capsys, dataset, "--db-chunk", last)["chunks"][0]["text"] == decode(dataset, db[last])


def test_similarity_is_the_cosine_of_the_stored_embeddings(dataset, capsys):
    layout = Layout(dataset)
    queries = np.load(layout.embeddings("val")).astype(np.float64)
    keys = np.load(layout.embeddings("train")).astype(np.float64)
    for c in report(capsys, dataset, "--sample", 1)["chunks"]:
        q = queries[c["chunk"]]
        for n in c["neighbors"]:
            k = keys[n["id"]]
            assert n["similarity"] == pytest.approx(q @ k / np.linalg.norm(q) / np.linalg.norm(k), abs=1e-3)


def test_train_neighbors_share_no_document_with_their_sample(dataset, capsys):
    m = load_manifest(dataset)
    per_sample = m["seq_len"] // m["chunk_size"]
    for s in range(0, m["counts"]["train"]["samples"], 7):
        chunks = report(capsys, dataset, "--split", "train", "--sample", s)["chunks"]
        assert [c["sample"] for c in chunks] == [s] * per_sample
        label = report(capsys, dataset, "--split", "train", "--chunk", (s + 1) * per_sample)["chunks"][0]
        lo, hi = chunks[0]["docs"][0], label["docs"][0]  # the sample's tokens and its label token
        for c in chunks:
            for n in c["neighbors"]:
                assert n["id"] >= 0
                end = (n["continuation_docs"] or n["docs"])[1]
                assert end < lo or n["docs"][0] > hi, f"sample {s} (docs {lo}..{hi}) retrieved {n}"


def test_bad_input_is_one_line(dataset, tmp_path, capsys):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(dataset, incomplete)
    m = load_manifest(incomplete)
    m["stages"]["neighbors"]["done"] = False
    save_manifest(incomplete, m)
    counts = load_manifest(dataset)["counts"]
    cases = {
        "not a retro_dist dataset": ["--dataset", tmp_path / "missing", "--sample", 0],
        "stage 'neighbors' has not finished": ["--dataset", incomplete, "--sample", 0],
        "unknown split 'test'": ["--dataset", dataset, "--split", "test", "--sample", 0],
        f"(valid: 0..{counts['val']['samples'] - 1})": ["--dataset", dataset, "--sample", counts["val"]["samples"]],
        f"(valid: 0..{counts['train']['chunks'] - 1})": ["--dataset", dataset, "--split", "train", "--chunk",
                                                          counts["train"]["chunks"]],
        "argument --chunk: must be at least 0, got -1": ["--dataset", dataset, "--split", "train", "--chunk", -1],
        "got --sample and --chunk": ["--dataset", dataset, "--sample", 0, "--chunk", 0],
        "got none": ["--dataset", dataset],
        "the database has": ["--dataset", dataset, "--db-chunk", counts["train"]["chunks"]],
    }
    # main() is the console script's entry point; one real process per case would cost seconds of torch import each
    for expected, args in cases.items():
        assert main(["neighbors", *map(str, args)]) == 2, expected
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("retro-dist neighbors: error: "), err
        assert expected in err, err

    # and through a real process: one line, no traceback; --help shows the defaults
    procs = [subprocess.Popen([sys.executable, "-m", "retro_dist.cli", "neighbors", *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in (cases["got none"], ["--help"])]
    (out, err), (helper, _) = (p.communicate(timeout=120) for p in procs)
    assert procs[0].returncode == 2 and out == "" and err.count("\n") == 1 and "got none" in err, err
    assert procs[1].returncode == 0 and "(default: 200)" in helper and "(default: val)" in helper
