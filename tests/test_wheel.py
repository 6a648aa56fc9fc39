"""`pip install .` (not editable) gives a working package: the wheel is built from a copy of the sources, installed
into a fresh virtualenv, and run from a directory outside the repository, so nothing can come from the source tree.

The fresh venv borrows the project venv's third-party packages (torch, deepspeed, faiss...) through a .pth line
instead of reinstalling them. A path line in a .pth is only appended to sys.path; the .pth files inside that directory
(the project's editable install of retro_dist among them) are not run, and each test checks that retro_dist and
data_prep are imported from the fresh venv's copy, i.e. from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# what the build reads: a missing entry here is a wheel that cannot be built from a clean clone either
SOURCES = ("pyproject.toml", "README.md", "retro_dist", "data_prep", "ds_configs", "launch")


def _env() -> dict[str, str]:
    """No PYTHONPATH (the suite's own runs put the repository there) and a CPU accelerator where there is no GPU."""
    import torch
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **({} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"}), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def _run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"$ {' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """A copy of what the build reads, symlinks kept as symlinks: building in the repository would reuse its build/
    directory, whose stale files setuptools puts into the wheel."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    return src


@pytest.fixture(scope="module")
def wheel(sources, tmp_path_factory) -> Path:
    """The wheel, built without build isolation (the project venv's setuptools, no download)."""
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir",
          str(dist), str(sources)], cwd=dist)
    [built] = dist.glob("retro_dist-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel, with the project venv's site-packages after its own on sys.path."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
          str(wheel)], cwd=venv.parent)
    # `pip install deepspeed` would have put its launcher here; the demo's launch/local.sh runs $RETRO_VENV/bin/deepspeed
    launcher = venv / "bin" / "deepspeed"
    launcher.write_text(f"#!{python}\nfrom deepspeed.launcher.runner import main\nmain()\n")
    launcher.chmod(0o755)
    return venv


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """The working directory of every command: outside the repository, so `python -m` cannot find the sources."""
    return tmp_path_factory.mktemp("elsewhere")


@pytest.fixture(scope="module")
def dataset(venv, outside) -> Path:
    """A tiny dataset made by the installed `retro-dist prepare` (data_prep from the wheel) from a corpus the wheel's
    data_prep writes."""
    corpus, out = outside / "corpus", outside / "ds"
    _run([str(venv / "bin" / "python"), "-c", "import sys; from pathlib import Path; from data_prep.corpora import "
          "stdlib_docstrings, write_corpus; write_corpus(Path(sys.argv[1]), stdlib_docstrings(200))", str(corpus)],
         cwd=outside)
    _run([str(venv / "bin" / "retro-dist"), "prepare", "--input", str(corpus), "--out", str(out), "--vocab-size",
          "512", "--chunk-size", "16", "--seq-len", "64", "--embedder", "hash-64", "--num-neighbors", "2",
          "--shard-samples", "40", "--val-fraction", "0.05"], cwd=outside)
    return out


def test_wheel_carries_the_default_configs_and_the_demo_launcher(wheel):
    """The files the package reads at run time are in the wheel, as the files themselves (not symlinks), with the
    contents of the top-level ds_configs/ and launch/ that people read and copy."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for path in sorted((REPO / "ds_configs").glob("*.json")) + [REPO / "launch" / "local.sh"]:
            packaged = f"retro_dist/{path.relative_to(REPO)}"
            assert packaged in names, f"{packaged} is not in {wheel.name}"
            assert z.read(packaged) == path.read_bytes(), packaged
        assert "retro_dist/configs/demo.yaml" in names
        assert "data_prep/__main__.py" in names


def test_sdist_carries_the_files_not_links(sources, tmp_path):
    """The sdist (what `pip install retro-dist` builds from) holds the same files as regular files: a wheel built from
    it has them too."""
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
          str(tmp_path)], cwd=sources)
    [sdist] = tmp_path.glob("retro_dist-*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
        for path in sorted((REPO / "ds_configs").glob("*.json")) + [REPO / "launch" / "local.sh"]:
            member = members.get(f"retro_dist/{path.relative_to(REPO)}")
            assert member is not None and member.isfile(), f"retro_dist/{path.relative_to(REPO)} in {sdist.name}"
            assert tar.extractfile(member).read() == path.read_bytes(), member.name


def test_installed_package_is_the_wheel(venv, outside):
    python = venv / "bin" / "python"
    result = _run([str(python), "-c", "import retro_dist, data_prep; print(retro_dist.__file__); "
                   "print(data_prep.__file__)"], cwd=outside)
    for line in result.stdout.split():
        assert Path(line).resolve().is_relative_to(venv.resolve()), result.stdout
    _run([str(python), "-m", "data_prep", "--help"], cwd=outside)


def test_installed_retro_dist_train_runs_a_step(venv, dataset, outside):
    """`retro-dist train` with the default ds_configs/zero2.json, which must come from the package."""
    run_dir = outside / "run"
    result = _run([str(venv / "bin" / "retro-dist"), "train", f"--data.dataset={dataset}", f"--run_dir={run_dir}",
                   "--model.preset=tiny", "--data.micro_batch=2", "--data.num_workers=0", "--train.precision=fp32",
                   "--train.steps=1", "--train.zero_stage=2", "--logging.every=1", "--logging.val_every=0"],
                  cwd=outside)
    assert "step 1/1 | loss" in result.stdout, result.stdout[-3000:]
    assert (run_dir / "ds_config.json").is_file()


def test_installed_demo_trains_through_its_launcher(venv, dataset, outside):
    """The demo's training step: the packaged launch/local.sh and configs/demo.yaml under the deepspeed launcher."""
    run_dir = outside / "demo_run"
    result = _run([str(venv / "bin" / "python"), "-c", "import sys; from pathlib import Path; "
                   "from retro_dist.demo import train; train(Path(sys.argv[1]), Path(sys.argv[2]), nproc=1, steps=1)",
                   str(dataset), str(run_dir)], cwd=outside)
    assert "step 1/1 | loss" in result.stdout + result.stderr, result.stdout[-3000:] + result.stderr[-3000:]
