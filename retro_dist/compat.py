"""One check that a model directory fits a dataset, shared by `retro-dist eval` and `retro-dist generate`.

Shapes and ids (chunk size, vocabulary, pad id, sequence length) are compared with the manifest by
retro_dist.data.loader.check_compatible. Those pass for a dataset whose tokenizer merely has the same or a smaller
vocabulary, yet its token ids mean other words to the model: the perplexities of such a pair are meaningless and its
retrievals decode to other text. So the tokenizer the model was exported with is compared with the dataset's too.
"""

from __future__ import annotations

import json
from pathlib import Path

from retro_dist.data.format import DatasetError, Layout


def check_same_tokenizer(model_dir: str | Path, dataset: str | Path) -> None:
    """The model's tokenizer.json (written by `retro-dist export`) and the dataset's must map text to the same ids."""
    mine, theirs = Path(model_dir) / "tokenizer.json", Layout(dataset).tokenizer
    if not mine.is_file():
        return  # a model without a tokenizer (converted from RETRO-pytorch) uses the dataset's
    if not theirs.is_file():
        raise DatasetError(f"{dataset} has no tokenizer.json: run `retro-dist prepare` on it to the end")
    if json.loads(mine.read_text()).get("model") != json.loads(theirs.read_text()).get("model"):
        raise DatasetError(f"the model's tokenizer ({mine}) differs from the dataset's ({theirs}): its token ids mean "
                           f"other words to the model; use the dataset the model was trained on, or one prepared "
                           f"with --tokenizer {mine}")


def check_model_fits_dataset(model_dir: str | Path, config, dataset: str | Path, manifest: dict) -> None:
    """One line if the model (its directory and RetroConfig) cannot be used on the dataset (its directory and
    manifest)."""
    from retro_dist.data.loader import check_compatible

    check_same_tokenizer(model_dir, dataset)
    check_compatible(manifest, config)
