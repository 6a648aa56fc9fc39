"""RetroLoader on real webdataset tars built by data_prep: contents, ranks, resume, bad data."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_prep.corpora import stdlib_docstrings, write_corpus
from data_prep.pipeline import main as prepare
from retro_dist import RetroConfig
import retro_dist.data.loader as loader_mod
from data_prep.shard import _write_shard
from retro_dist.data.format import DatasetError, Layout, file_sha256, load_manifest, neighbor_tokens, save_manifest
from retro_dist.data.loader import Item, RetroLoader, check_compatible, deal
from retro_dist.data.shards import DataError

SEQ, CS, K = 64, 16, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    corpus = write_corpus(root / "corpus", stdlib_docstrings(300))
    assert prepare(["--input", str(corpus), "--out", str(root / "ds"), "--vocab-size", "800", "--chunk-size",
                    str(CS), "--seq-len", str(SEQ), "--embedder", "hash-64", "--num-neighbors", str(K),
                    "--shard-samples", "37", "--val-fraction", "0.05"]) == 0
    return root / "ds"


def epoch(loader):
    return [b for b in loader]


def test_batches_match_the_arrays(dataset):
    layout, m = Layout(dataset), load_manifest(dataset)
    stream = np.load(layout.chunks("train")).reshape(-1)
    neighbors, db = np.load(layout.neighbors("train")), np.load(layout.chunks("train"))
    loader = RetroLoader(dataset, "train", batch_size=4, num_neighbors=2, streams=1)  # one stream: no wrap-around
    batches = epoch(loader)
    assert len(batches) == len(loader) == m["counts"]["train"]["samples"] // 4
    seen = []
    for b in batches:
        assert b["tokens"].dtype == torch.int64 and b["tokens"].shape == (4, SEQ + 1)
        assert b["retrieved"].dtype == torch.int64 and b["retrieved"].shape == (4, SEQ // CS, 2, 2 * CS)
        for row, s in enumerate(b["index"].tolist()):
            np.testing.assert_array_equal(b["tokens"][row], stream[s * SEQ: s * SEQ + SEQ + 1])
            ids = neighbors[s * (SEQ // CS): (s + 1) * (SEQ // CS), :2]
            np.testing.assert_array_equal(b["retrieved"][row], neighbor_tokens(db, ids, pad_id=m["pad_id"]))
            seen.append(s)
    assert len(set(seen)) == len(seen)  # one stream, one epoch: no sample twice
    assert loader.state_dict()["epoch"] == 1
    assert sorted(seen) != seen  # shuffled


def test_pin_memory_reaches_the_join(dataset, monkeypatch):
    """With pin_memory the joined tokens and retrieved are built in page-locked buffers (non_blocking copies to a
    GPU are asynchronous only from there); off by default. A CPU-only torch cannot pin, so the allocation of the
    page-locked buffer is replaced by a recording plain one; the join itself runs as it does on CUDA."""
    calls = []

    def recording(shape, dtype):
        calls.append((tuple(shape), dtype))
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(loader_mod, "pinned_empty", recording)
    plain = next(iter(RetroLoader(dataset, "train", batch_size=4, global_batch=8, rank=0, world_size=2)))
    assert not calls
    pinned = next(iter(RetroLoader(dataset, "train", batch_size=4, global_batch=8, rank=0, world_size=2,
                                   num_workers=2, pin_memory=True)))
    assert calls == [((4, SEQ + 1), torch.int64), ((4, SEQ // CS, K, 2 * CS), torch.int64)]
    for key in ("tokens", "retrieved", "index", "position"):
        assert torch.equal(plain[key], pinned[key]), key


def test_retrieval_off(dataset):
    batch = next(iter(RetroLoader(dataset, "val", batch_size=2, retrieval=False)))
    assert batch["retrieved"] is None and batch["tokens"].shape == (2, SEQ + 1)


@pytest.mark.parametrize("world, split", [(2, "train"), (3, "train"), (3, "val")])
def test_ranks_disjoint_and_equal(dataset, world, split):
    """Equal batch counts whatever the shard counts (train: 3 ranks get uneven shard counts; val: fewer shards than
    ranks), and no sample on two ranks."""
    per_rank = [[s for b in epoch(RetroLoader(dataset, split, batch_size=2, rank=r, world_size=world))
                 for s in b["index"].tolist()] for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(per_rank[a]) & set(per_rank[b])


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("stop", [5, 29])
def test_resume_equals_uninterrupted(dataset, workers, stop):
    full = RetroLoader(dataset, "train", batch_size=3, num_workers=workers, seed=7)
    reference = [b["index"].tolist() for b in epoch(full)] + [b["index"].tolist() for b in epoch(full)][:10]
    first = RetroLoader(dataset, "train", batch_size=3, num_workers=workers, seed=7)
    got = []
    for b in first:
        got.append(b["index"].tolist())
        if len(got) == stop:
            break
    state = json.loads(json.dumps(first.state_dict()))  # travels through a checkpoint as plain data
    resumed = RetroLoader(dataset, "train", batch_size=3, num_workers=workers, seed=7)
    resumed.load_state_dict(state)
    got += [b["index"].tolist() for b in resumed]
    got += [b["index"].tolist() for b in epoch(resumed)][:10]
    assert got == reference


def _global_batches(loaders, count=None):
    """Sample indices of each global batch, from one loader per rank (each rank's micro-batches in order)."""
    per_rank = [[b["index"].tolist() for b in loader] for loader in loaders]
    acc = loaders[0].accumulation
    out = []
    for t in range(len(per_rank[0]) // acc):
        out.append(sorted(s for rank in per_rank for m in rank[t * acc:(t + 1) * acc] for s in m))
    return out[:count]


@pytest.mark.parametrize("world, micro, workers", [(1, 8, 0), (2, 2, 1), (4, 1, 2), (8, 1, 0), (2, 4, 2)])
def test_global_order_independent_of_layout(dataset, world, micro, workers):
    """Global batch t holds the same samples for any world size, micro-batch / accumulation split and worker
    count (issue 15): 1 rank x 8, 2 x 2 x acc 2, 4 x 1 x acc 2, 8 x 1, 2 x 4."""
    reference = _global_batches([RetroLoader(dataset, "train", batch_size=8, global_batch=8, seed=3)])
    got = _global_batches([RetroLoader(dataset, "train", batch_size=micro, global_batch=8, seed=3, rank=r,
                                       world_size=world, num_workers=workers) for r in range(world)])
    assert got == reference and len(reference) == load_manifest(dataset)["counts"]["train"]["samples"] // 8
    assert len({s for b in reference for s in b}) == 8 * len(reference)  # no sample twice in an epoch


@pytest.mark.parametrize("new_world", [1, 4])
def test_resume_on_another_world_size(dataset, new_world):
    """2 ranks stop after 5 global batches; 1 or 4 ranks continue the same global batch sequence exactly, into the
    next epoch."""
    single = RetroLoader(dataset, "train", batch_size=4, global_batch=8, seed=5)
    reference = _global_batches([single]) + _global_batches([single])  # epochs 0 and 1
    loaders = [RetroLoader(dataset, "train", batch_size=2, global_batch=8, seed=5, rank=r, world_size=2)
               for r in range(2)]
    its = [iter(ld) for ld in loaders]
    got = [sorted(s for it in its for _ in range(2) for s in next(it)["index"].tolist()) for _ in range(5)]
    states = [json.loads(json.dumps(ld.state_dict())) for ld in loaders]
    assert states[0] == states[1] and states[0]["batches"] == 5 and states[0]["samples"] == 40
    resumed = [RetroLoader(dataset, "train", batch_size=8 // new_world, global_batch=8, seed=5, rank=r,
                           world_size=new_world, num_workers=1) for r in range(new_world)]
    for ld in resumed:
        ld.load_state_dict(states[0])
    got += _global_batches(resumed)
    assert resumed[0].epoch == 1
    got += _global_batches(resumed)
    assert got == reference


# uneven shards -------------------------------------------------------------------------------------------------

UNEVEN = 260  # training samples in 11 shards: 10 x 24 + 20


@pytest.fixture(scope="module")
def uneven(dataset, tmp_path_factory):
    """The dataset with its train split cut to 260 samples in 11 shards of 10 x 24 + 20, by the shard stage's own
    writer: with 8 canonical streams, whole shards give the streams 48, 24 or 20 samples for a quota of 32."""
    ds = tmp_path_factory.mktemp("uneven") / "ds"
    shutil.copytree(dataset, ds)
    layout, m = Layout(ds), load_manifest(ds)
    for meta in m["shards"]["train"]:
        (layout.shards / meta["name"]).unlink()
    shards = []
    for number, begin in enumerate(range(0, UNEVEN, 24)):
        path = layout.shards / layout.shard_name("train", number)
        samples = range(begin, min(UNEVEN, begin + 24))
        _write_shard(path, layout, "train", samples, seq_len=SEQ, chunk_size=CS)
        shards.append({"name": path.name, "samples": len(samples), "bytes": path.stat().st_size,
                       "sha256": file_sha256(path)})
    assert [s["samples"] for s in shards] == [24] * 10 + [20]
    m["shards"]["train"], m["counts"]["train"]["samples"] = shards, UNEVEN
    save_manifest(ds, m)
    return ds


@pytest.mark.parametrize("world, micro, workers", [(2, 4, 0), (1, 8, 1), (4, 1, 2)])
def test_uneven_shards_epoch_sees_every_sample_once(uneven, world, micro, workers):
    """260 samples in 11 shards (10 x 24 + 20), global batch 8 (8 canonical streams): each of two epochs yields
    every sample at most once and all but fewer than one global batch of them, the same global batches at 1, 2 and
    4 ranks."""
    for seed in (4, 5):
        single = RetroLoader(uneven, "train", batch_size=8, global_batch=8, seed=seed)
        reference = [_global_batches([single]) for _ in range(2)]
        loaders = [RetroLoader(uneven, "train", batch_size=micro, global_batch=8, seed=seed, rank=r,
                               world_size=world, num_workers=workers) for r in range(world)]
        for epoch_number, want in enumerate(reference):
            got = _global_batches(loaders)
            seen = [s for b in got for s in b]
            print(f"seed {seed} epoch {epoch_number}, {world} ranks x micro-batch {micro}: {len(set(seen))} "
                  f"distinct of {UNEVEN} samples, {len(seen) - len(set(seen))} repeated")
            assert got == want
            assert len(seen) == UNEVEN // 8 * 8
            assert len(set(seen)) == len(seen) >= UNEVEN - 8
        assert reference[0] != reference[1]


def test_uneven_shards_resume_on_another_world_size(uneven):
    """2 ranks stop after 13 of 32 global batches (inside the samples dealt from split shards); 1 and 4 ranks
    continue the same sequence exactly, and the epoch still holds no sample twice."""
    reference = _global_batches([RetroLoader(uneven, "train", batch_size=8, global_batch=8, seed=2)])
    for new_world in (1, 4):
        loaders = [RetroLoader(uneven, "train", batch_size=2, global_batch=8, seed=2, rank=r, world_size=2)
                   for r in range(2)]
        its = [iter(ld) for ld in loaders]
        got = [sorted(s for it in its for _ in range(2) for s in next(it)["index"].tolist()) for _ in range(13)]
        state = json.loads(json.dumps(loaders[0].state_dict()))
        resumed = [RetroLoader(uneven, "train", batch_size=8 // new_world, global_batch=8, seed=2, rank=r,
                               world_size=new_world, num_workers=1) for r in range(new_world)]
        for ld in resumed:
            ld.load_state_dict(state)
        got += _global_batches(resumed)
        assert got == reference
        assert len({s for b in got for s in b}) == len(got) * 8


def test_uneven_shards_cost_in_reads(uneven, monkeypatch):
    """Tar reads per epoch, all ranks together (no workers, so each rank's shard cache is one): every shard once,
    plus at most one read per canonical stream but one for the samples dealt from split shards."""
    reads = []
    real = loader_mod.read_shard
    monkeypatch.setattr(loader_mod, "read_shard", lambda url, **kw: reads.append(url) or real(url, **kw))
    for world in (1, 2, 8):
        reads.clear()
        for r in range(world):
            epoch(RetroLoader(uneven, "train", batch_size=8 // world, global_batch=8, seed=3, rank=r,
                              world_size=world))
        print(f"{world} ranks: {len(reads)} tar reads per epoch for 11 shards ({len(set(reads))} distinct)")
        assert len(set(reads)) == 11 and len(reads) <= 11 + 8 - 1


def test_deal_fills_every_stream_once():
    """deal() on random shard sizes: every stream gets exactly its quota, no slot twice, at most C - 1 shards read
    by a second stream, and none when whole shards already fill every stream."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        streams = int(rng.choice([1, 2, 4, 8]))
        sizes = [int(x) for x in rng.integers(1, 40, size=int(rng.integers(1, 30)))]
        if rng.random() < 0.3:
            sizes = [37] * len(sizes)
        total, per = sum(sizes), int(rng.integers(1, 5))
        if total < streams * per:
            continue
        quota = total // (streams * per) * per
        order = [int(x) for x in rng.permutation(len(sizes))]
        plan = deal(order, sizes, streams, quota)
        assert len(plan) == streams and all(sum(it.stop - it.start for it in items) == quota for items in plan)
        slots = [(it.shard, k) for items in plan for it in items for k in range(it.start, it.stop)]
        assert len(set(slots)) == len(slots) and all(0 <= k < sizes[sh] for sh, k in slots)
        readers = [{it.shard for it in items} for items in plan]
        extra = sum(len(r) for r in readers) - len(set().union(*readers))
        assert extra <= streams - 1, (sizes, order, streams, quota, plan)
        whole = [order[s:len(order) // streams * streams:streams] for s in range(streams)]
        if all(sum(sizes[sh] for sh in w) >= quota for w in whole):
            assert extra == 0
    assert deal([1, 0], [3, 5], 2, 4) == [[Item(1, 0, 4)], [Item(0, 0, 3), Item(1, 4, 5)]]


def test_bad_divisibility_names_what_works(dataset):
    with pytest.raises(ValueError, match=r"3 ranks do not divide the 8 canonical streams \(world sizes that work: "
                                         r"1, 2, 4, 8\)"):
        RetroLoader(dataset, "train", batch_size=1, global_batch=24, streams=8, rank=0, world_size=3)
    with pytest.raises(ValueError, match="micro batch 3 does not divide a rank's 4 samples"):
        RetroLoader(dataset, "train", batch_size=3, global_batch=8, rank=0, world_size=2)


def test_fewer_neighbors_and_bad_requests(dataset):
    with pytest.raises(ValueError, match="the dataset has 3 per chunk"):
        RetroLoader(dataset, "train", batch_size=2, num_neighbors=4)
    with pytest.raises(DatasetError, match="fewer than one global batch"):
        RetroLoader(dataset, "val", batch_size=10_000)
    with pytest.raises(DatasetError, match="not a retro_dist dataset"):
        RetroLoader(dataset.parent / "nothing", "train", batch_size=2)


def test_model_compatibility(dataset):
    m = load_manifest(dataset)
    ok = RetroConfig(num_tokens=m["vocab_size"], max_seq_len=SEQ, chunk_size=CS, enc_dim=32, dec_dim=32,
                     enc_depth=1, dec_depth=1, dec_cross_attn_layers=(1,), dim_head=32)
    check_compatible(m, ok)
    bad = RetroConfig(**{**ok.to_dict(), "chunk_size": 64, "max_seq_len": 32})
    with pytest.raises(DatasetError, match="chunk_size 16 vs model 64; seq_len 64 > model max_seq_len 32"):
        check_compatible(m, bad)


# bad data -------------------------------------------------------------------------------------------------------

def _copy(dataset: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(dataset, out)
    return out


def _rewrite_shard(ds: Path, number: int, change) -> str:
    """Rewrite train shard `number` with one sample changed; update its checksum, as a buggy writer would."""
    m = load_manifest(ds)
    meta = m["shards"]["train"][number]
    path = Layout(ds).shards / meta["name"]
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    change(samples[3])
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k != "__url__" and k != "__local_path__"})
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    save_manifest(ds, m)
    return samples[3]["__key__"]


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


BAD = {
    "missing key": (lambda s: s.pop("neighbors.npy"), "missing neighbors.npy"),
    "neighbor id out of range": (lambda s: s.update({"neighbors.npy": _npy(np.full((4, 3), 10**7, np.int32))}),
                                 "neighbor id 10000000 outside"),
    "tokens of the wrong length": (lambda s: s.update({"tokens.npy": _npy(np.zeros(SEQ, np.int32))}),
                                   "tokens int32[64], expected int32[65]"),
    "undecodable npy": (lambda s: s.update({"tokens.npy": b"garbage"}), "undecodable .npy"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sample(dataset, tmp_path, case):
    change, message = BAD[case]
    ds = _copy(dataset, tmp_path)
    key = _rewrite_shard(ds, 0, change)
    with pytest.raises(DataError, match=re.escape(f"train-000000.tar, sample {key}: {message}")):
        epoch(RetroLoader(ds, "train", batch_size=2))
    _skips_and_keeps_ranks_equal(ds, expected_skipped=1)


def test_truncated_tar(dataset, tmp_path):
    ds = _copy(dataset, tmp_path)
    m = load_manifest(ds)
    path = Layout(ds).shards / m["shards"]["train"][1]["name"]
    path.write_bytes(path.read_bytes()[: 20_000])
    with pytest.raises(DataError, match="train-000001.tar: sha256 differs"):
        epoch(RetroLoader(ds, "train", batch_size=2))
    m["shards"]["train"][1]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    save_manifest(ds, m)
    with pytest.raises(DataError, match="train-000001.tar: unreadable tar after"):
        epoch(RetroLoader(ds, "train", batch_size=2))
    _skips_and_keeps_ranks_equal(ds, expected_skipped=None)


def test_flipped_byte_is_caught_by_checksum(dataset, tmp_path):
    ds = _copy(dataset, tmp_path)
    path = Layout(ds).shards / load_manifest(ds)["shards"]["train"][2]["name"]
    data = bytearray(path.read_bytes())
    data[5000] ^= 0x01  # inside a member's payload: tar itself would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-000002.tar: sha256 differs"):
        epoch(RetroLoader(ds, "train", batch_size=2))
    _skips_and_keeps_ranks_equal(ds, expected_skipped=37)


def _skips_and_keeps_ranks_equal(ds: Path, expected_skipped: int | None) -> None:
    counts, skipped = [], 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for r in range(2):
            loader = RetroLoader(ds, "train", batch_size=2, rank=r, world_size=2, on_bad_sample="skip")
            counts.append(len(epoch(loader)))
            skipped += loader.skipped
    assert counts[0] == counts[1] == len(loader)
    assert any("skipping bad data" in str(w.message) for w in caught)
    assert skipped == expected_skipped if expected_skipped is not None else skipped > 0


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_skip_takes_replacements_and_keeps_ranks_equal(dataset, tmp_path, damage):
    """Issue 14 item 4: 3 shards, 2 ranks, one shard truncated to half (or a flipped byte): under skip both ranks
    yield every batch of two epochs, bad samples replaced by good ones, the same global order at 1 rank."""
    ds = _copy(dataset, tmp_path)
    m = load_manifest(ds)
    m["shards"]["train"] = m["shards"]["train"][:3]
    m["counts"]["train"]["samples"] = sum(s["samples"] for s in m["shards"]["train"])
    save_manifest(ds, m)
    path = Layout(ds).shards / m["shards"]["train"][1]["name"]
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[5000] ^= 0x01
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaders = [RetroLoader(ds, "train", batch_size=2, global_batch=4, rank=r, world_size=2, num_workers=1,
                               on_bad_sample="skip", seed=s) for s in (0, 1) for r in range(2)]
        for seed in range(2):
            pair = loaders[2 * seed: 2 * seed + 2]
            runs = [[b["index"].tolist() for _ in range(2) for b in ld] for ld in pair]
            assert len(runs[0]) == len(runs[1]) == 2 * len(pair[0])
            assert all(len(b) == 2 for run in runs for b in run)
            bad = {i for i in range(37, 74)}
            assert pair[0].skipped + pair[1].skipped > 0
            assert not bad & {s for run in runs for b in run for s in b} or damage == "truncate"
            single = RetroLoader(ds, "train", batch_size=4, global_batch=4, on_bad_sample="skip", seed=seed)
            assert _global_batches([single]) == [sorted(a + b) for a, b in zip(runs[0], runs[1])][: len(single)]


def test_corrupt_shard_in_a_worker_is_one_line(dataset, tmp_path):
    """Issue 14 item 6: the error a worker hits reaches the main process as the worker's own one line (shard and
    what is wrong), not wrapped in DataLoader's "Caught ... Original Traceback"."""
    ds = _copy(dataset, tmp_path)
    path = Layout(ds).shards / load_manifest(ds)["shards"]["train"][2]["name"]
    data = bytearray(path.read_bytes())
    data[5000] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as caught:
        epoch(RetroLoader(ds, "train", batch_size=2, num_workers=1))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message and len(message) < 300, message
    assert re.search(r"train-000002.tar: sha256 differs", message)
