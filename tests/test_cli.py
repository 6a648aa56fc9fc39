"""`retro-dist convert` through the installed console script: both directions, and one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from retro_dist import RETRO

KWARGS = dict(num_tokens=100, max_seq_len=64, enc_dim=32, enc_depth=1, dec_dim=64, dec_depth=2,
              dec_cross_attn_layers=(2,), dim_head=32, chunk_size=8)


def cli(*args):
    # the console script installed beside this interpreter (the venv need not be on PATH)
    exe = shutil.which("retro-dist", path=str(Path(sys.executable).parent))
    assert exe, "the retro-dist console script is not installed (pip install -e .)"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=120)


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
