"""Training a retrofit through `retro-dist train --model.retrofit=BASE`: real DeepSpeed engines on CPU ranks (gloo), a
random-init Llama base saved with save_pretrained and a dataset prepared with its tokenizer.

Frozen: every base weight stays bit-identical and retrieval-off logits stay the base's; unfrozen: they move. ZeRO-3
builds the retrofit partitioned (no rank holds the whole model) from the base's safetensors and trains to ZeRO-2's
losses; resume is exact; a dataset with another tokenizer is refused in one line. This file is also the worker that
torchrun starts for the partitioned build.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.train_helpers import ROOT, env, losses, tb_losses, tiny_args, tiny_dataset, train

pytestmark = pytest.mark.slow  # multi-process training runs

CCA = "[2,4]"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data_prep.corpora import stdlib_docstrings
    from retro_dist.retrofit.base import llama_style_tokenizer, save_random_base

    root = tmp_path_factory.mktemp("retrofit")
    tokenizer = llama_style_tokenizer(stdlib_docstrings(200), 512)
    base = save_random_base(root / "base", family="llama", vocab_size=tokenizer.get_vocab_size(), layers=4,
                            tokenizer=tokenizer, seed=3)
    dataset = tiny_dataset(root, tokenizer=str(base / "tokenizer.json"))
    return base, dataset


def _args(setup, run_dir, *extra: str) -> list[str]:
    base, dataset = setup
    return tiny_args(dataset, run_dir, f"--model.retrofit={base}", f"--model.retrofit_arch.cca_layers={CCA}",
                     "--train.steps=8", "--logging.val_every=8", *extra)


def _checkpoint_module(run_dir, tag="step_00000008") -> dict[str, torch.Tensor]:
    """The module's weights as a ZeRO-1/2 checkpoint keeps them whole (rank 0's model states)."""
    from retro_dist.train.safe_load import safe_torch_load
    with safe_torch_load():
        return torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu")["module"]


def _base_weights(base) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return {f"base.{k}": v for k, v in load_file(str(base / "model.safetensors")).items()}


def _logits(setup, state: dict[str, torch.Tensor]):
    """Logits of the trained retrofit with retrieval off and with true-shaped random neighbors, and the base's."""
    from retro_dist.retrofit.model import load_base, retrofit
    base, dataset = setup
    manifest = json.loads((dataset / "manifest.json").read_text())
    model = retrofit(base, max_seq_len=64, chunk_size=16, pad_id=manifest["pad_id"], cca_layers=(2, 4))
    model.load_state_dict(state, strict=True)
    model.eval()
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(3, 500, (2, 64), generator=g)
    neighbors = torch.randint(3, 500, (2, 4, 2, 32), generator=g)
    with torch.no_grad():
        return model(seq), model(seq, neighbors), load_base(base).eval()(input_ids=seq).logits


@pytest.fixture(scope="module")
def frozen(setup, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("frozen") / "run"
    result = train(1, _args(setup, run_dir, "--train.zero_stage=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout


def test_frozen_base_stays_the_base(setup, frozen):
    run_dir, out = frozen
    assert "M trainable" in out and "base frozen" in out
    state = _checkpoint_module(run_dir)
    reference = _base_weights(setup[0])
    assert set(reference) <= set(state)
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    off, on, base = _logits(setup, state)
    assert torch.equal(off, base)  # retrieval off: the base's logits, bit for bit
    assert not torch.equal(on, base)  # the new weights moved and are read
    assert "val loss" in out and "retrieval off" in out


@pytest.fixture(scope="module")
def unfrozen(setup, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("unfrozen") / "run"
    result = train(1, _args(setup, run_dir, "--train.zero_stage=2", "--model.freeze_base=false"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout


def test_unfrozen_base_moves(setup, unfrozen):
    run_dir, out = unfrozen
    assert "base trained" in out
    state = _checkpoint_module(run_dir)
    moved = [k for k, v in _base_weights(setup[0]).items() if not torch.equal(state[k], v)]
    assert len(moved) == len(_base_weights(setup[0]))
    off, _, base = _logits(setup, state)
    assert not torch.allclose(off, base)


@pytest.mark.parametrize("which", ["frozen", "unfrozen"])
def test_export_eval_generate_round_trip(setup, request, which, tmp_path):
    """export -> the exported model gives the checkpoint's logits; eval and generate run on it, generation with the
    KV cache gives the tokens of generation without it; the base part loads in transformers alone."""
    from transformers import AutoModelForCausalLM

    from retro_dist.evaluate import evaluate_model
    from retro_dist.generate import generate, load_for_generation
    from retro_dist.pretrained import load_model
    from retro_dist.train.export import export

    base, dataset = setup
    run_dir, _ = request.getfixturevalue(which)
    out = export(run_dir, tmp_path / "export")
    model = load_model(out).eval()
    off, on, base_logits = _logits(setup, _checkpoint_module(run_dir))
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(3, 500, (2, 64), generator=g)
    neighbors = torch.randint(3, 500, (2, 4, 2, 32), generator=g)
    with torch.no_grad():
        assert torch.equal(model(seq), off) and torch.equal(model(seq, neighbors), on)
        served = AutoModelForCausalLM.from_pretrained(str(out / "base")).eval()(input_ids=seq).logits
    assert torch.equal(served, off)
    if which == "frozen":
        assert torch.equal(served, base_logits)
        assert (out / "base" / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    report = evaluate_model(str(out), str(dataset), max_samples=8, batch_size=4)
    assert set(report["loss"]) == {"true", "random", "off"}
    model, retriever = load_for_generation(out, dataset)
    prompt = list(range(10, 30))
    cached = generate(model, retriever, prompt, max_new_tokens=20, use_cache=True)
    uncached = generate(model, retriever, prompt, max_new_tokens=20, use_cache=False)
    assert cached.tokens == uncached.tokens and len(cached.tokens) == 40 and len(cached.neighbor_ids) == 2


def test_resume_is_exact(setup, frozen):
    run_dir, out = frozen
    before = losses(out)
    resumed = train(1, _args(setup, run_dir, "--train.zero_stage=2", "--checkpoint.resume=step_00000004"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step_00000004" in resumed.stdout
    after = losses(resumed.stdout)
    assert sorted(after) == [5, 6, 7, 8]
    for step, loss in after.items():
        assert loss == before[step], step


def test_zero3_matches_zero2_at_two_ranks(setup, tmp_path):
    runs = {}
    for stage in (2, 3):
        result = train(2, _args(setup, tmp_path / f"z{stage}", f"--train.zero_stage={stage}", "--train.steps=4",
                                "--logging.val_every=0", "--model.freeze_base=false"))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[stage] = losses(result.stdout)
    assert sorted(runs[3]) == [1, 2, 3, 4]
    for step in runs[2]:
        assert runs[3][step] == pytest.approx(runs[2][step], abs=2e-4), step


def test_zero3_builds_partitioned_from_the_base_files(setup, tmp_path):
    """Two ranks build under zero.Init: every parameter is a placeholder with its partition; gathered, the base's
    weights are its files' and the new weights those of a plain build."""
    base, dataset = setup
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(__import__("retro_dist.dist", fromlist=["free_port"]).free_port()),
           str(ROOT / "tests" / "test_retrofit_train.py"), str(base), str(dataset)]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert report == {"partitioned": True, "base_equal": True, "new_equal": True, "count_equal": True}


def test_a_dataset_with_another_tokenizer_is_refused(setup, tmp_path):
    base, _ = setup
    other = tiny_dataset(tmp_path, documents=120)  # its own trained BPE
    result = subprocess.run([sys.executable, "-m", "retro_dist.cli", "train",
                             *tiny_args(other, tmp_path / "run", f"--model.retrofit={base}")],
                            env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    line = [x for x in result.stderr.splitlines() if "error:" in x]
    assert len(line) == 1 and "tokenized with another tokenizer than the base's" in line[0] and "--tokenizer" in line[0]


@pytest.mark.parametrize("arg, message", [
    ("--model.retrofit={tmp}", "is not a transformers checkpoint directory"),
    ("--model.retrofit={base} --model.retrofit_arch.cca_layers=[9]", "within 1..4"),
])
def test_bad_retrofit_settings_are_one_line_and_write_nothing(setup, tmp_path, arg, message):
    base, dataset = setup
    run_dir = tmp_path / "run"
    args = tiny_args(dataset, run_dir, *arg.format(tmp=tmp_path, base=base).split())
    result = subprocess.run([sys.executable, "-m", "retro_dist.cli", "train", *args], env=env(), capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()


def worker(base: str, dataset: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import load_file

    from retro_dist.config import load_run_config
    from retro_dist.retrofit.build import build_retrofit, retrofit_model_config, retrofit_settings
    from retro_dist.train.ds_config import batch_plan, build_ds_config, engine_settings

    deepspeed.init_distributed(dist_backend="gloo")
    run = load_run_config(None, [f"--data.dataset={dataset}", "--train.zero_stage=3", f"--model.retrofit={base}",
                                 f"--model.retrofit_arch.cca_layers={CCA}"])
    manifest = json.loads((ROOT / dataset / "manifest.json").read_text())
    config = retrofit_model_config(run.model, manifest, dataset)
    ds_config = build_ds_config(run, engine_settings(run), batch_plan(2, 1, 2), "fp32")
    model = build_retrofit(retrofit_settings(run.model), config, ds_config, seed=5, activation_checkpointing="none",
                           zero3=True)
    plain = build_retrofit(retrofit_settings(run.model), config, ds_config, seed=5, activation_checkpointing="none",
                           zero3=False)
    report = {"partitioned": all(p.numel() == 0 and p.ds_tensor is not None for p in model.parameters())}
    files = load_file(str(ROOT / base / "model.safetensors"))
    named = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(named.values())):
        report["base_equal"] = all(torch.equal(named[f"base.{k}"], v) for k, v in files.items())
        report["new_equal"] = all(torch.equal(p, named[n]) for n, p in plain.named_parameters()
                                  if not n.startswith("base."))
    from retro_dist.train.build import parameter_count
    report["count_equal"] = parameter_count(model) == parameter_count(plain)
    if dist.get_rank() == 0:
        print(json.dumps(report), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker(sys.argv[1], sys.argv[2])


def test_same_curve_at_any_world_size_with_activation_checkpointing(setup, tmp_path):
    """Unfrozen, global batch 4 of micro-batches of 2: 1 rank accumulating 2 and 2 ranks recomputing every block
    in backward follow one loss curve."""
    curves = {}
    for nproc, extra in ((1, ()), (2, ("--train.activation_checkpointing=every",))):
        run_dir = tmp_path / f"n{nproc}"
        result = train(nproc, _args(setup, run_dir, "--train.steps=4", "--train.global_batch=4",
                                    "--logging.val_every=0", "--model.freeze_base=false", *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        curves[nproc] = tb_losses(run_dir)
    assert sorted(curves[1]) == [1, 2, 3, 4]
    for step, loss in curves[1].items():
        assert curves[2][step] == pytest.approx(loss, rel=1e-5), step


def test_bf16_retrofit_of_a_base_with_tied_embeddings(setup, tmp_path):
    """A base whose output layer is its token embedding (tie_word_embeddings, as SmolLM and Llama 3.2 1B), frozen,
    trained in bf16: it trains, the base's weights come back from export as the base's, tied, and the base part
    serves the base's logits in transformers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from retro_dist.retrofit.base import save_random_base
    from retro_dist.train.export import export
    from tokenizers import Tokenizer

    base0, dataset = setup
    tokenizer = Tokenizer.from_file(str(base0 / "tokenizer.json"))
    base = save_random_base(tmp_path / "tied", family="llama", vocab_size=tokenizer.get_vocab_size(), layers=4,
                            tokenizer=tokenizer, seed=5, tie_word_embeddings=True)
    run_dir = tmp_path / "run"
    result = train(1, tiny_args(dataset, run_dir, f"--model.retrofit={base}", f"--model.retrofit_arch.cca_layers={CCA}",
                                "--train.steps=6", "--logging.val_every=6", "--train.precision=bf16"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bf16" in result.stdout
    curve = losses(result.stdout)
    assert sorted(curve) == list(range(1, 7)) and all(loss == loss for loss in curve.values())
    out = export(run_dir, tmp_path / "export")
    served = AutoModelForCausalLM.from_pretrained(str(out / "base")).eval()
    original = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    assert served.lm_head.weight.data_ptr() == served.model.embed_tokens.weight.data_ptr()  # still tied
    for name, tensor in load_file(str(base / "model.safetensors")).items():
        assert torch.equal(served.state_dict()[name].float(), tensor.float()), name
    seq = torch.randint(3, 500, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(served(input_ids=seq).logits, original(input_ids=seq).logits)
