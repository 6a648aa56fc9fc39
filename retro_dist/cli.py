"""`retro-dist`: one console script, one subcommand per stage. Bad input exits non-zero with one clear line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from retro_dist.console import error_line, stderr_line
from retro_dist.device import CHOICES, resolve_device


def _convert(args: argparse.Namespace) -> None:
    import torch

    from retro_dist import RETRO
    from retro_dist.atomic import atomic_path, write_text_atomic
    from retro_dist.convert import (config_from_retro_pytorch, from_retro_pytorch, infer_config,
                                    retro_pytorch_kwargs, to_retro_pytorch)
    from retro_dist.train.safe_load import safe_load

    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if args.to == "retro-dist":
        state = safe_load(src, map_location="cpu")
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or "token_emb.weight" not in state:
            raise ValueError(f"{src} is not a RETRO-pytorch state dict (no token_emb.weight); save one with "
                             f"torch.save(retro.state_dict(), path)")
        if args.kwargs:
            config = config_from_retro_pytorch(json.loads(Path(args.kwargs).read_text()))
        else:
            config = infer_config(state, chunk_size=args.chunk_size, pad_id=args.pad_id)
        model = RETRO(config)
        try:
            model.load_state_dict(from_retro_pytorch(state, config), strict=True)
        except RuntimeError as e:
            raise ValueError(f"{src} does not fit the config ({str(e).splitlines()[0]}); "
                             f"pass the kwargs it was built with as --kwargs FILE.json") from None
        model.save_pretrained(dst)
        print(f"wrote {dst} ({model.num_parameters:,} parameters, config {dst / 'config.json'})")
    else:
        model = RETRO.from_pretrained(src)
        state = to_retro_pytorch(model.state_dict(), model.config)
        with atomic_path(dst) as tmp:
            torch.save(state, tmp)
        kwargs_path = dst.with_name(dst.name + ".kwargs.json")
        write_text_atomic(kwargs_path, json.dumps(retro_pytorch_kwargs(model.config), indent=2, sort_keys=True) + "\n")
        print(f"wrote {dst}; build the model with retro_pytorch.RETRO(**json.load(open('{kwargs_path}')))")


def _prepare(args: argparse.Namespace) -> None:
    from data_prep.pipeline import run_cli
    from retro_dist.data.format import STAGES

    code = run_cli(args, args.stage or list(STAGES))
    if code:
        raise SystemExit(code)


def _size(text: str) -> int:
    """A byte count: 2GB, 500MB, 1.5GiB or plain bytes (the hub's decimal units, binary with an i)."""
    units = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip()
    for unit in sorted(units, key=len, reverse=True):
        if unit and number.upper().endswith(unit):
            number, scale = number[:-len(unit)], units[unit]
            break
    else:
        scale = 1
    try:
        size = int(float(number) * scale)
    except ValueError:
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 2GB, 500MB or 1GiB")
    return size


def _export(args: argparse.Namespace) -> None:
    from retro_dist.train.export import export
    out = export(args.run_dir, args.out or Path(args.run_dir) / "export", step=args.step, dtype=args.dtype,
                 max_shard_size=args.max_shard_size)
    print(f"exported {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")


def _eval(args: argparse.Namespace) -> None:
    from retro_dist.evaluate import evaluate_model, format_report
    r = evaluate_model(args.model, args.dataset, split=args.split, batch_size=args.micro_batch,
                       max_samples=args.max_samples, num_neighbors=args.num_neighbors, seed=args.seed,
                       device=resolve_device(args.device))
    print(json.dumps(r, indent=2) if args.json else format_report(r))


def _generate(args: argparse.Namespace) -> None:
    from retro_dist.generate import check_sampling, describe, generate, load_for_generation

    check_sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   max_new_tokens=args.max_new_tokens)
    model, retriever = load_for_generation(args.model, args.dataset, num_neighbors=args.num_neighbors,
                                           device=resolve_device(args.device))
    prompt = retriever.tokenizer.encode(args.prompt, add_special_tokens=False).ids
    out = generate(model, retriever, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(describe(out, retriever, prompt_text=args.prompt))


def _neighbors(args: argparse.Namespace) -> None:
    from retro_dist.inspect_neighbors import format_text, gather
    report = gather(args.dataset, split=args.split, sample=args.sample, chunk=args.chunk, db_chunk=args.db_chunk)
    print(json.dumps(report, ensure_ascii=False) if args.json else format_text(report, width=args.width))


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one line naming --help, not a usage block and a line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def at_least(low: int):
    """An int option's type: refuses values below `low` when parsed."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


class Deprecated(argparse.Action):
    """An old spelling of an option: still works, with one line naming the new one."""

    def __init__(self, option_strings, dest, *, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        stderr_line(f"{parser.prog}: {option_string} is deprecated: use {self.new}")
        setattr(namespace, self.dest, values)


def add_option(parser: argparse.ArgumentParser, new: str, old: str, **kwargs) -> None:
    parser.add_argument(new, **kwargs)
    parser.add_argument(old, action=Deprecated, new=new, dest=kwargs.get("dest", new.lstrip("-").replace("-", "_")),
                        type=kwargs.get("type"))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="retro-dist", description=__doc__,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    from data_prep.pipeline import __doc__ as prepare_doc, add_prepare_arguments
    prepare = sub.add_parser("prepare", help="raw text -> retrieval dataset (tokenize, embed, index, neighbors, "
                                             "shard)", description=prepare_doc,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prepare_arguments(prepare)
    prepare.set_defaults(run=_prepare)

    sub.add_parser("train", help="train under any launcher: retro-dist train --config FILE --section.key=value ...",
                   add_help=False)

    export = sub.add_parser("export", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            help="consolidate a checkpoint (any ZeRO stage) into one model directory")
    export.add_argument("run_dir", metavar="RUN", help="the run directory")
    export.add_argument("--out", help="output model directory (default: RUN/export)")
    export.add_argument("--step", type=at_least(0), help="the checkpoint's step (default: the newest whole one)")
    export.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights dtype")
    export.add_argument("--max-shard-size", type=_size, default="2GB",
                        help="above this, model-0000K-of-0000N.safetensors + model.safetensors.index.json")
    export.set_defaults(run=_export)

    evaluate = sub.add_parser("eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              help="token-weighted loss and perplexity with true neighbors, random neighbors and "
                                   "retrieval off, and the loss by neighbor-overlap bucket")
    evaluate.add_argument("--model", required=True, help="an exported model directory")
    evaluate.add_argument("--dataset", required=True, help="a dataset directory")
    evaluate.add_argument("--split", default="val")
    add_option(evaluate, "--micro-batch", "--batch-size", type=at_least(1), default=4,
               help="samples per forward (data.micro_batch in training)")
    evaluate.add_argument("--max-samples", type=at_least(0), default=0, help="the first N samples (0: the whole split)")
    add_option(evaluate, "--num-neighbors", "--neighbors", type=at_least(1), default=None,
               help="neighbors per chunk (default: the dataset's)")
    evaluate.add_argument("--seed", type=at_least(0), default=0, help="seed of the random-neighbor draw")
    evaluate.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    evaluate.add_argument("--device", default="auto", help=f"where the model runs: {CHOICES} (auto: a GPU if any)")
    evaluate.set_defaults(run=_eval)

    gen = sub.add_parser("generate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         help="sample a continuation, retrieving neighbors from the dataset as chunks complete")
    gen.add_argument("--model", required=True, help="an exported model directory")
    gen.add_argument("--dataset", required=True, help="the dataset (index, database, embedder) to retrieve from")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)  # sampling settings: check_sampling's lines
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy; sampling above 0")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the K likeliest tokens; 0 means no filter")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 means no filter")
    add_option(gen, "--num-neighbors", "--neighbors", type=at_least(1), default=None,
               help="neighbors per chunk (default: the dataset's)")
    gen.add_argument("--seed", type=at_least(0), default=0)
    gen.add_argument("--device", default="auto", help=f"where the model runs: {CHOICES} (auto: a GPU if any)")
    gen.set_defaults(run=_generate)

    nb = sub.add_parser("neighbors", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="show what chunks retrieved: text, documents and similarity of each neighbor",
                        description="Every chunk of one sample (--sample), one chunk (--chunk) or one database chunk "
                                    "(--db-chunk, its text only); neighbors print as chunk ‖ continuation.")
    nb.add_argument("--dataset", required=True, help="a dataset directory")
    nb.add_argument("--split", default="val", help="train or val (the database is train's chunk stream)")
    nb.add_argument("--sample", type=at_least(0), help="every chunk of this sample of the split")
    nb.add_argument("--chunk", type=at_least(0), help="this chunk id of the split's chunk stream")
    nb.add_argument("--db-chunk", type=at_least(0), help="this chunk of the database: its text, no neighbors")
    nb.add_argument("--width", type=at_least(0), default=200, help="cut each text to this many characters (0: no limit)")
    nb.add_argument("--json", action="store_true", help="print one JSON object (full texts) instead")
    nb.set_defaults(run=_neighbors)

    convert = sub.add_parser("convert", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                             help="convert weights between RETRO-pytorch and retro_dist, exactly",
                             description="RETRO-pytorch state dict (.pt) <-> retro_dist model directory.")
    convert.add_argument("src", help="RETRO-pytorch state dict file (--to retro-dist) or retro_dist model dir")
    convert.add_argument("dst", help="retro_dist model dir (--to retro-dist) or .pt file (--to retro-pytorch)")
    convert.add_argument("--to", choices=["retro-dist", "retro-pytorch"], default="retro-dist",
                         help="format to write")
    convert.add_argument("--kwargs", help="JSON file of the RETRO-pytorch RETRO(...) kwargs; without it the "
                                          "config is read from the weights' shapes")
    convert.add_argument("--chunk-size", type=at_least(1), default=64, help="chunk size, when inferring the config")
    convert.add_argument("--pad-id", type=at_least(0), default=0, help="pad id, when inferring the config")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the deepspeed launcher puts --local_rank=N before the subcommand; LOCAL_RANK in the environment says the same
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if argv[:1] == ["train"]:  # its own parser: free-form --section.key=value overrides
        from retro_dist.train.main import main as train_main
        return train_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad option (its one line is printed): the code, as the commands return it
        return e.code if isinstance(e.code, int) else 2
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        error_line(f"retro-dist {args.command}", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
