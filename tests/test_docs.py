"""The documentation can be trusted: every relative link of README.md and docs/*.md resolves (file, and #anchor by
GitHub's rules), every `retro-dist <cmd> --option` the docs name is in that command's --help, every run-config key
they name (`--section.key=`, `section.key`) exists, the README stays a landing page that links every docs page, and
the example run configs load."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import sys
import unicodedata
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 150

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")

# what a command line in the docs starts with -> the command whose options follow it
COMMANDS = [
    (re.compile(r"retro-dist\s+(prepare|train|eval|export|generate|neighbors|convert)\b"), None),
    (re.compile(r"python\s+-m\s+data_prep(?![.\w])"), "prepare"),
    (re.compile(r"-m\s+retro_dist\.cli\s+train\b"), "train"),
    (re.compile(r"python\s+-m\s+retro_dist\.demo\b"), "demo"),
    (re.compile(r"launch/(?:local|hostfile|mpirun)\.sh\b|launch/slurm/train\.sbatch\b"), "train"),
    (re.compile(r"launch/slurm/prepare\.sbatch\b"), "prepare"),
]
OPTION = re.compile(r"(?<![\w./-])--([a-zA-Z][\w-]*(?:\.[\w-]+)*)")
SECTIONS = ("model", "data", "optim", "train", "checkpoint", "logging")
# `model.safetensors`, `train.sbatch`: file names that look like config keys
FILE_SUFFIXES = {"safetensors", "sbatch", "json", "yaml", "py", "npy", "tar", "faiss", "sh", "md", "txt", "png"}
PLACEHOLDERS = {"section.key", "section.key=value"}


# ---------------------------------------------------------------- reading markdown

def split_code(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines, code-block lines), each as (line number, text)."""
    prose, code, fenced = [], [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        (code if fenced else prose).append((number, line))
    return prose, code


def heading_text(markdown: str) -> str:
    """A heading as GitHub renders it to text: code spans, links and emphasis reduced to their text."""
    text = re.sub(r"`([^`]*)`", r"\1", markdown)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"(\*\*|__|\*|(?<!\w)_|_(?!\w))", "", text)
    return re.sub(r"<[^>]+>", "", text).strip()


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading (github-slugger): lower case, every character but letters, marks, numbers,
    connector punctuation (`_`), `-` and space removed, each space turned into `-`."""
    out = []
    for ch in heading_text(heading).lower():
        if ch in " -" or ch == "_" or unicodedata.category(ch)[0] in "LMN" or unicodedata.category(ch) == "Pc":
            out.append("-" if ch == " " else ch)
    return "".join(out)


def anchors(text: str) -> set[str]:
    """Every anchor the page's headings give, duplicates numbered as GitHub does (`a`, `a-1`, `a-2`)."""
    prose, _ = split_code(text)
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose:
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        if slug in seen:
            seen[slug] += 1
            out.add(f"{slug}-{seen[slug]}")
        else:
            seen[slug] = 0
            out.add(slug)
    return out


def broken_links(page: Path) -> list[str]:
    """Each relative link of the page that does not resolve, as 'line N: target (why)'."""
    text = page.read_text()
    prose, _ = split_code(text)
    problems = []
    for number, line in prose:
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            if not resolved.exists():
                problems.append(f"line {number}: {target} ({resolved.relative_to(ROOT)} does not exist)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
                problems.append(f"line {number}: {target} (no heading of {resolved.name} has the anchor #{anchor})")
    return problems


# ---------------------------------------------------------------- what the code accepts

@cache
def help_options(command: str) -> frozenset[str]:
    """The --options of a command, read from its --help as a user would see it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        from retro_dist.cli import main
        from retro_dist.demo import main as demo_main
        try:  # argparse's --help exits; retro-dist's main returns its code instead
            code = demo_main(["--help"]) if command == "demo" else main([command, "--help"])
        except SystemExit as e:
            code = e.code
        assert code == 0, command
    return frozenset(OPTION.findall(out.getvalue()))


@cache
def config_keys() -> tuple[frozenset[str], dict[str, frozenset[str] | None]]:
    """(every RunConfig key as `section.key`, plus the top-level fields; for each free-form dict key such as
    `model.arch`, the keys it takes, or None where any key goes)."""
    from retro_dist.config import RunConfig
    from retro_dist.model.config import RetroConfig
    from retro_dist.model.presets import DATASET_KEYS

    schemas: dict[str, type] = {"model.arch": RetroConfig}
    try:
        from retro_dist.retrofit.model import RetrofitConfig
        schemas["model.retrofit_arch"] = RetrofitConfig
    except ImportError:
        pass
    keys, dicts = set(), {}
    for f in dataclasses.fields(RunConfig):
        value = getattr(RunConfig(), f.name)
        if not dataclasses.is_dataclass(value):
            keys.add(f.name)
            continue
        for g in dataclasses.fields(value):
            key = f"{f.name}.{g.name}"
            keys.add(key)
            if isinstance(getattr(value, g.name), dict):
                schema = schemas.get(key)
                dicts[key] = (frozenset({h.name for h in dataclasses.fields(schema)} - set(DATASET_KEYS))
                              if schema else None)
    return frozenset(keys), dicts


def config_key_problem(key: str, value: str | None) -> str | None:
    """None if `key` (e.g. `train.global_batch`, `model.arch.dec_depth`) is a run-config key, else why not. A key
    the config does not declare still passes when load_run_config takes it (an old spelling it maps onto a key)."""
    keys, dicts = config_keys()
    head, _, sub = key.rpartition(".")
    if key in keys or (head in dicts and (dicts[head] is None or sub in dicts[head])):
        return None
    if head not in dicts:  # an old spelling that load_run_config maps onto a key, with the documented value or 1
        from retro_dist.config import load_run_config
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                load_run_config(None, ["--data.dataset=x", f"--{key}={value if value is not None else 1}"])
            return None
        except ValueError:
            pass
    return f"{key} is not a run-config key"


# ---------------------------------------------------------------- finding options in the docs

def command_segments(text: str) -> list[tuple[int, str, str]]:
    """(line, command, the text after it up to the end of its command line), from code blocks (with backslash
    continuations) and from code spans in prose."""
    prose, code = split_code(text)
    candidates: list[tuple[int, str]] = []
    joined, start = "", None
    for number, line in code:
        if start is None:
            start = number
        joined += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            candidates.append((start, joined))
            joined, start = "", None
    for number, line in prose:
        candidates += [(number, span) for span in CODE_SPAN.findall(line)]
    segments = []
    for number, line in candidates:
        line = re.split(r"\s#\s|\s#$|\s&&\s|;\s|\s\|\s", line)[0]  # a comment, a chained or piped command ends it
        hits = sorted((m.start(), m.end(), name or m.group(1)) for pattern, name in COMMANDS
                      for m in pattern.finditer(line))
        for i, (begin, end, name) in enumerate(hits):
            stop = hits[i + 1][0] if i + 1 < len(hits) else len(line)
            segments.append((number, name, line[end:stop]))
    return segments


def named_options(text: str) -> list[tuple[int, str | None, str]]:
    """(line, command or None, option): the options after a command, those in the first cell of an options table
    (attributed to the command named last before it: each options table follows the command it documents), and
    every dotted `--section.key` anywhere."""
    segments = command_segments(text)
    found = [(number, name, o) for number, name, rest in segments for o in OPTION.findall(rest)]
    last_command = {number: name for number, name, _ in segments}
    prose, code = split_code(text)
    last = None
    for number, line in sorted(prose + code):
        last = last_command.get(number, last)
        if line.startswith("|") and last is not None and (number, line) in prose:
            found += [(number, last, o) for o in OPTION.findall(line.split("|")[1]) if "." not in o]
        found += [(number, None, o) for o in OPTION.findall(line) if "." in o]
    return found


def unknown_options(page: Path) -> list[str]:
    """Each option or run-config key the page names that the code does not have, as 'line N: ... (why)'."""
    text = page.read_text()
    problems = []
    for number, command, option in named_options(text):
        if "." in option or (command == "train" and option in config_keys()[0]):
            if option in PLACEHOLDERS:
                continue
            value = re.search(re.escape("--" + option) + r"=([^\s`]+)", text)
            why = config_key_problem(option, value.group(1).rstrip(",;)") if value else None)
            if why:
                problems.append(f"line {number}: --{option} ({why})")
        elif command is not None and option != "help" and option not in help_options(command):
            problems.append(f"line {number}: `{command}` has no option --{option} in its --help")
    prose, _ = split_code(text)
    for number, line in prose:
        for span in CODE_SPAN.findall(line):
            m = re.fullmatch(r"((?:%s)\.[a-z_]+(?:\.[a-z_]+)*)(?:=(\S*))?" % "|".join(SECTIONS), span)
            if m and m.group(1).rsplit(".", 1)[-1] not in FILE_SUFFIXES:
                why = config_key_problem(m.group(1), m.group(2) or None)
                if why:
                    problems.append(f"line {number}: `{span}` ({why})")
    return sorted(set(problems), key=lambda p: (int(p.split(":")[0].split()[1]), p))


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    problems = broken_links(page)
    assert not problems, f"{page.relative_to(ROOT)}: links that do not resolve:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_named_options_exist(page: Path) -> None:
    problems = unknown_options(page)
    assert not problems, f"{page.relative_to(ROOT)}: options the code does not have:\n" + "\n".join(problems)


def test_readme_is_a_landing_page_that_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(readme)}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("name", ["demo.yaml", "gpu_node.yaml"])
def test_example_run_configs_load_and_plan(name: str) -> None:
    from retro_dist.config import load_run_config
    from retro_dist.train.ds_config import batch_plan

    run = load_run_config(str(ROOT / "retro_dist" / "configs" / name), ["--data.dataset=data/x"])
    if run.train.global_batch:  # a fixed global batch: the run resumes on 1, 2, 4 or 8 ranks
        for world in (1, 2, 4, 8):
            plan = batch_plan(run.train.global_batch, run.data.micro_batch, world)
            assert plan.global_batch == run.train.global_batch


# ---------------------------------------------------------------- the checker finds what it must

def test_github_slugs() -> None:
    assert github_slug("The demo (`make demo`)") == "the-demo-make-demo"
    assert github_slug("Where we differ from RETRO-pytorch 0.3.9 (its bugs, behaving as its documentation means)") \
        == "where-we-differ-from-retro-pytorch-039-its-bugs-behaving-as-its-documentation-means"
    assert github_slug("Training (`retro_dist/train/`, `ds_configs/`)") == "training-retro_disttrain-ds_configs"
    assert github_slug("A refused `prepare` changes nothing") == "a-refused-prepare-changes-nothing"
    assert github_slug("**Bold** and [a link](x.md)") == "bold-and-a-link"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1", "a-2"}


def test_checker_finds_broken_links_and_unknown_options(tmp_path: Path, monkeypatch) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "other.md").write_text("# Other\n\n## Real section\n")
    page = docs / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md#real-section) [bad file](missing.md) [bad anchor](other.md#no-such) [self](#page)\n"
        "`[not a link](missing.md)`\n\n"
        "```bash\n"
        "launch/local.sh --config c.yaml --train.global_batch=8 --train.no_such_key=1 --run_dir=r\n"
        "retro-dist eval --model m --dataset d --max-samples 4 --no-such-flag\n"
        "```\n\n"
        "| option | default |\n|---|---|\n| `--model` | |\n| `--made-up` | 0 |\n\n"
        "Keys: `optim.lr`, `optim.nope`, `model.arch.dec_depth`, `model.arch.num_tokens`, `model.arch.nope`, "
        "`model.safetensors`.\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    links = broken_links(page)
    assert [p.split(" ")[2] for p in links] == ["missing.md", "other.md#no-such"]
    problems = "\n".join(unknown_options(page))
    for expected in ("--no-such-flag", "--train.no_such_key", "--made-up", "`optim.nope`",
                     "`model.arch.num_tokens`", "`model.arch.nope`"):
        assert expected in problems
    for fine in ("--max-samples", "--train.global_batch", "--run_dir", "--model", "--config",
                 "`optim.lr`", "dec_depth", "safetensors"):
        assert fine not in problems
