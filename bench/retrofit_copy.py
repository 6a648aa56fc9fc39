"""Does a pretrained base that copies in context make CCA copy from neighbors at unrelated offsets?

Small models trained from scratch do not learn the misaligned copy task (bench/copy_task.py --task misaligned):
the words after a chunk sit in its neighbor at another offset, and finding them there needs an induction circuit
(match the current token in the neighbor, read the token after it). A pretrained model has induction heads. This
bench pretrains two small Llama bases through our trainer, retrieval off, on the copy task's vocabulary:

  induction base   documents that repeat a random segment of words at an unrelated offset, so the base learns to
                   copy in context (measured: its loss on a segment's second occurrence against its first);
  control base     the same steps on documents of fresh random words only (nothing to copy in context);

then retrofits each with its weights frozen (only CCA + the neighbor encoder train; --unfrozen: every weight) on the
misaligned copy task (--task aligned: documents that fill whole chunks in the base's BPE, so CCA can copy by
position: the control that a retrofit learns to copy at all), validating every --val-every steps with true
neighbors, random neighbors and retrieval off. Retrieval helps when the true-neighbor loss falls below the
random-neighbor loss; the curves say how fast. --scratch adds RETRO's tiny preset trained from scratch on the same
dataset, the reference (--bases with no names: only that).

    python bench/retrofit_copy.py --out /tmp/retrofit-copy     # ~30 min per base on one CPU core

A base already pretrained into --out is reused, so a second call with other retrofit settings (--task, --unfrozen,
--cca-layers, --retrofit-steps, --no-neighbor-norm) trains only the retrofit.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from copy_task import curves, print_curve  # noqa: E402
from retrofit import train  # noqa: E402


def repeat_docs(count: int, vocab: list[str], *, repeat: bool, seed: int) -> list[str]:
    """Documents of random words; with repeat, a segment of 15-30 words comes back twice, each time after 0-15 other
    words (unrelated offsets); without, fresh words stand in for the copies (same lengths)."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(n))

    docs = []
    for _ in range(count):
        size = rng.randint(15, 30)
        segment = words(size)
        parts = [words(rng.randint(0, 15)), segment]
        for _ in range(2):
            parts += [words(rng.randint(0, 15)), segment if repeat else words(size)]
        docs.append(" ".join(part for part in parts if part))
    return docs


def aligned_docs(tokenizer, vocab: list[str], count: int, *, chunk_size: int = 64, seed: int = 0) -> list[str]:
    """The aligned copy task in the base's BPE: twins of words that are one token each (after a space; the header
    one token at the start), 2 chunk_size - 1 tokens, so with its EOS every document fills exactly two chunks and a
    neighbor's continuation lines up token for token with what follows the chunk (copying by position)."""
    def tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    body_words = [w for w in vocab if tokens(" " + w) == 1]
    headers = [w for w in vocab if tokens(w) == 1][:2]
    rng = random.Random(seed)
    docs = []
    for _ in range(count // 2):
        body = " ".join(rng.choice(body_words) for _ in range(2 * chunk_size - 2))
        docs += [f"{headers[0]} {body}", f"{headers[1]} {body}"]
    rng.shuffle(docs)
    assert all(tokens(doc) == 2 * chunk_size - 1 for doc in docs), "a word of the aligned task is not one token"
    return docs


def in_context_copy(base: Path, tokenizer, vocab: list[str], *, docs: int = 64, seed: int = 99) -> tuple[float, float]:
    """The base's mean loss on the last 20 tokens of a repeated segment's first and of its second occurrence."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    rng = random.Random(seed)
    first, second = [], []
    for _ in range(docs):
        head = " ".join(rng.choice(vocab) for _ in range(rng.randint(5, 40)))
        segment = " ".join(rng.choice(vocab) for _ in range(40))
        gap = " ".join(rng.choice(vocab) for _ in range(rng.randint(5, 40)))
        a = tokenizer.encode(f"{head} {segment}").ids
        b = tokenizer.encode(f"{head} {segment} {gap} {segment}").ids
        with torch.no_grad():
            logits = model(torch.tensor([b])).logits[0]
        losses = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(b[1:]), reduction="none")
        first.append(losses[len(a) - 21:len(a) - 1].mean().item())
        second.append(losses[-20:].mean().item())
    return sum(first) / docs, sum(second) / docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/retrofit-copy"))
    parser.add_argument("--pretrain-steps", type=int, default=6000)
    parser.add_argument("--retrofit-steps", type=int, default=400)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=1.0, help="1 keeps the lr constant after warmup")
    parser.add_argument("--bases", nargs="*", default=["induction", "control"])
    parser.add_argument("--task", choices=["misaligned", "aligned"], default="misaligned")
    parser.add_argument("--unfrozen", action="store_true", help="retrofit with every weight training")
    parser.add_argument("--scratch", action="store_true",
                        help="also train RETRO's tiny preset from scratch on the task's dataset (the reference)")
    parser.add_argument("--no-neighbor-norm", action="store_true",
                        help="the encoder reads the neighbors' embeddings at the base's scale")
    parser.add_argument("--cca-layers", default=None,
                        help="decoder layers followed by CCA, e.g. [1] (default: the retrofit's, the last layer here)")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    from tokenizers import Tokenizer

    from data_prep.corpora import _words, copy_task_docs, write_corpus
    from data_prep.pipeline import main as prepare
    from retro_dist.retrofit.base import llama_style_tokenizer, save_random_base

    t0 = time.perf_counter()
    vocab = _words(1119)  # the copy task's vocabulary
    copy_docs = copy_task_docs(3000, aligned=False)  # the tokenizer's text, whichever task runs
    pretrain_docs = {name: repeat_docs(12000, vocab, repeat=name == "induction", seed=1) for name in args.bases}
    tok_path = out / "tokenizer.json"
    if not tok_path.is_file():
        llama_style_tokenizer(copy_docs + pretrain_docs[args.bases[0]], 2048).save(str(tok_path))
    tokenizer = Tokenizer.from_file(str(tok_path))

    def dataset(name: str, docs: list[str], retrieval: bool, seq_len: int = 256) -> Path:
        ds = out / f"ds-{name}"
        if not (ds / "manifest.json").is_file():
            corpus = write_corpus(out / f"corpus-{name}", docs)
            options = ["--embedder", "hash-256", "--num-neighbors", "2"] if retrieval else ["--embedder", "hash-256"]
            assert prepare(["--input", str(corpus), "--out", str(ds), "--tokenizer", str(tok_path), "--seq-len",
                            str(seq_len), "--chunk-size", "64", "--val-fraction", "0.05", *options]) == 0
        return ds

    task_docs = copy_docs if args.task == "misaligned" else aligned_docs(tokenizer, vocab, 3000)
    copy_ds = dataset(f"copy-{args.task}", task_docs, True)
    common = [f"--data.micro_batch={args.micro_batch}", "--data.num_workers=0", "--train.precision=fp32",
              "--train.zero_stage=2", f"--optim.lr={args.lr}", "--optim.warmup_steps=30",
              f"--optim.min_lr_ratio={args.min_lr_ratio}", "--logging.every=50",
              "--checkpoint.every=100000"]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"retrofit copy bench: {cpu}; bases Llama hidden {args.hidden}, {args.layers} layers, vocab 2048; "
          f"pretraining seq 128, copy task seq 256, "
          f"chunk 64; micro-batch {args.micro_batch}, lr {args.lr}; data prep {time.perf_counter() - t0:.0f} s\n",
          flush=True)
    task = [*common, f"--data.dataset={copy_ds}", f"--train.steps={args.retrofit_steps}",
            f"--logging.val_every={args.val_every}", "--logging.val_samples=0"]  # every run on the copy task
    if args.scratch:
        run_dir = out / f"scratch-tiny-{args.task}-{args.retrofit_steps}"
        seconds = train(run_dir, [*task, "--model.preset=tiny"], run_dir.with_suffix(".log"))
        print_curve(f"RETRO tiny preset from scratch, on the {args.task} copy task ({seconds:.0f} s)", curves(run_dir))
    for name in args.bases:
        base0 = out / f"base-init-{name}"
        if not (base0 / "config.json").is_file():
            save_random_base(base0, family="llama", vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden,
                             layers=args.layers, heads=args.hidden // 32, kv_heads=max(1, args.hidden // 64),
                             intermediate_size=args.hidden * 8 // 3 // 16 * 16, max_positions=256,
                             tokenizer=tokenizer, seed=0)
        pre = out / f"pretrain-{name}"
        if (pre / "export" / "base" / "config.json").is_file():  # pretrained by an earlier run into --out
            how = f"pretrained base reused from {pre / 'export' / 'base'}"
        else:
            seconds = train(pre, [*common, f"--data.dataset={dataset(name, pretrain_docs[name], False, 128)}",
                                  f"--model.retrofit={base0}", "--model.freeze_base=false", "--data.retrieval=false",
                                  f"--train.steps={args.pretrain_steps}", "--logging.val_every=0",
                                  "--logging.tensorboard=false"], out / f"pretrain-{name}.log")
            how = f"pretrained {args.pretrain_steps} steps in {seconds:.0f} s"
        first, second = in_context_copy(pre / "export" / "base", tokenizer, vocab)
        print(f"{name} base: {how}; in-context loss on a segment's first occurrence {first:.3f}, on its second "
              f"{second:.3f}", flush=True)
        arch = [f"--model.retrofit_arch.cca_layers={args.cca_layers}"] if args.cca_layers else []
        arch += ["--model.retrofit_arch.neighbor_norm=false"] if args.no_neighbor_norm else []
        tag = f"{name}-cca{args.cca_layers.strip('[]').replace(',', '-')}" if args.cca_layers else name
        tag += "-aligned" if args.task == "aligned" else ""
        tag += "-unfrozen" if args.unfrozen else ""
        tag += "-nonorm" if args.no_neighbor_norm else ""
        run_dir = out / f"retrofit-{tag}-{args.retrofit_steps}"
        seconds = train(run_dir, [*task, f"--model.retrofit={pre / 'export' / 'base'}",
                                  f"--model.freeze_base={str(not args.unfrozen).lower()}", *arch],
                        run_dir.with_suffix(".log"))
        where = f"CCA after layer(s) {args.cca_layers}" if args.cca_layers else "CCA after the last layer"
        weights = "unfrozen" if args.unfrozen else "frozen"
        print_curve(f"{name} base retrofitted, {weights}, {where}, on the {args.task} copy task ({seconds:.0f} s)",
                    curves(run_dir))


if __name__ == "__main__":
    main()
