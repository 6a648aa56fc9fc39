"""`retro-dist` through the installed console script: convert both ways, one-line errors, numbers range-checked
when parsed, old option spellings."""

import json
import re
import subprocess
import sys

import pytest
import torch

from retro_dist import RETRO
from tests.train_helpers import cli

KWARGS = dict(num_tokens=100, max_seq_len=64, enc_dim=32, enc_depth=1, dec_dim=64, dec_depth=2,
              dec_cross_attn_layers=(2,), dim_head=32, chunk_size=8)


def test_convert_both_ways(retro_pytorch, tmp_path):
    ref = retro_pytorch.RETRO(**KWARGS)
    torch.save(ref.state_dict(), tmp_path / "rp.pt")
    (tmp_path / "kwargs.json").write_text(json.dumps(KWARGS))
    seq, retrieved = torch.randint(1, 100, (2, 32)), torch.randint(1, 100, (2, 4, 2, 16))
    with torch.no_grad():
        expected = ref(seq, retrieved)

    for i, extra in enumerate((["--kwargs", tmp_path / "kwargs.json"], ["--chunk-size", 8])):
        out = tmp_path / f"model{i}"
        result = cli("convert", tmp_path / "rp.pt", out, *extra)
        assert result.returncode == 0, result.stderr
        model = RETRO.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(seq, retrieved), expected, rtol=1e-5, atol=1e-5)

    result = cli("convert", out, tmp_path / "back.pt", "--to", "retro-pytorch")
    assert result.returncode == 0, result.stderr
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    rebuilt = retro_pytorch.RETRO(**json.loads((tmp_path / "back.pt.kwargs.json").read_text()))
    rebuilt.load_state_dict(back)


def test_convert_errors_are_one_line(retro_pytorch, tmp_path):
    result = cli("convert", tmp_path / "missing.pt", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "does not exist" in result.stderr

    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    result = cli("convert", tmp_path / "other.pt", tmp_path / "out")
    assert result.returncode == 2 and "not a RETRO-pytorch state dict" in result.stderr

    torch.save(retro_pytorch.RETRO(**KWARGS).state_dict(), tmp_path / "rp.pt")
    (tmp_path / "wrong.json").write_text(json.dumps({**KWARGS, "dec_dim": 96}))
    result = cli("convert", tmp_path / "rp.pt", tmp_path / "out", "--kwargs", tmp_path / "wrong.json")
    assert result.returncode == 2 and "does not fit the config" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out" / "config.json").exists()


def test_help_lists_defaults():
    result = cli("convert", "--help")
    assert result.returncode == 0 and "default: retro-dist" in result.stdout


def test_arch_keys_of_the_dataset_are_refused_in_one_line(tmp_path):
    """num_tokens, max_seq_len, chunk_size and pad_id come from the dataset: refused at config load, before any
    dataset or process group is touched (it was a TypeError from preset_config)."""
    for key, value in (("num_tokens", 500), ("max_seq_len", 4096), ("pad_id", 1)):
        result = cli("train", f"--data.dataset={tmp_path}", f"--run_dir={tmp_path / 'run'}",
                     f"--model.arch.{key}={value}")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"model.arch.{key} cannot be set: it comes from the dataset's manifest" in result.stderr
        assert "vocab_size" in result.stderr and "Traceback" not in result.stderr
    result = cli("train", f"--data.dataset={tmp_path}", "--model.arch.dec_depht=4")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "model.arch.dec_depht is not a model setting; valid keys: enc_dim" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["eval", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["eval", "--micro-batch", "-1"], "argument --micro-batch: must be at least 1, got -1"),
    (["eval", "--max-samples", "-5"], "argument --max-samples: must be at least 0, got -5"),
    (["eval", "--num-neighbors", "0"], "argument --num-neighbors: must be at least 1, got 0"),
    (["generate", "--prompt", "x", "--max-new-tokens", "-1"], "max_new_tokens=-1 must be 0 or more"),
    (["neighbors", "--sample", "-2"], "argument --sample: must be at least 0, got -2"),
    (["export", "RUN", "--step", "-1"], "argument --step: must be at least 0, got -1"),
])
def test_numbers_are_range_checked_when_parsed(args, message, tmp_path):
    required = [] if args[0] == "export" else ["--dataset", str(tmp_path)] + (
        [] if args[0] == "neighbors" else ["--model", str(tmp_path)])
    result = subprocess.run([sys.executable, "-m", "retro_dist.cli", *args, *required], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_old_option_spellings_still_work_with_one_line(tmp_path):
    from retro_dist.config import load_run_config
    run = load_run_config(None, ["--data.dataset=d", "--data.micro_batch=4", "--logging.val_batches=3"])
    assert run.logging.val_samples == 12
    result = subprocess.run([sys.executable, "-m", "retro_dist.cli", "eval", "--model", str(tmp_path / "m"),
                             "--dataset", str(tmp_path), "--neighbors", "2", "--batch-size", "2"],
                            capture_output=True, text=True)
    assert "--neighbors is deprecated: use --num-neighbors" in result.stderr
    assert "--batch-size is deprecated: use --micro-batch" in result.stderr
    assert "config.json is missing" in result.stderr  # parsing went on to the model directory


def test_config_numbers_are_range_checked():
    from retro_dist.config import load_run_config
    for bad, message in (("--optim.lr=0", "optim.lr=0.0 must be positive"),
                         ("--logging.val_samples=-5", "logging.val_samples=-5 must be at least 0"),
                         ("--data.num_workers=-1", "data.num_workers=-1 must be at least 0"),
                         ("--optim.min_lr_ratio=1.5", "optim.min_lr_ratio=1.5 must lie in [0, 1]")):
        with pytest.raises(ValueError, match=re.escape(message)):
            load_run_config(None, ["--data.dataset=d", bad])


class _Writes:
    """A stderr that keeps each write apart."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_every_line_for_people_reaches_stderr_in_one_write(monkeypatch, tmp_path):
    """Every rank of a job prints the same error into one stream, and with PYTHONUNBUFFERED (the launchers set it)
    each write reaches the stream on its own: a line written as its text and then its newline (print's way)
    interleaves with another rank's line."""
    from data_prep.pipeline import main as prepare_main
    from retro_dist.cli import main as cli_main
    from retro_dist.config import load_run_config

    stderr = _Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr("retro_dist.train.main._teardown", lambda code: code)  # it ends the process with os._exit
    assert cli_main(["train", "--data.dataset=d", "stray"]) == 2  # train's error
    load_run_config(None, ["--data.dataset=d", "--logging.val_batches=3"])  # train's deprecation
    assert prepare_main(["--input", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert cli_main(["eval", "--model", str(tmp_path / "m"), "--dataset", str(tmp_path), "--neighbors", "2"]) == 2
    assert len(stderr.writes) == 5, stderr.writes
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in stderr.writes), stderr.writes
