"""data_prep at corpus scale: every stage at two corpus sizes 10x apart, 1 rank vs 2, and a 10B-token projection.

    python bench/prepare_scale.py [--sizes 15e6 150e6 | --quick] [--work DIR] [--out-json FILE]

Builds real-text corpora (installed Python packages' sources and docs, then the system's documentation: JSON-lines,
deduplicated; the larger one's documents extend the smaller one's in the same order) once under --work and reuses
them. Runs each stage as its own `prepare --stage NAME` process, watching the memory of its process tree, three
times: small corpus on 1 rank and on 2 ranks (mpirun), large corpus on 1 rank; every rank gets one thread and one
core. Prints markdown tables (per-stage time, throughput and peak memory with their growth beside the targets; index
bytes per chunk; recall@10; the 2-rank speed-up; a projection for 10B tokens on N nodes) and writes them as JSON.
Most of the time is the large 1-rank run; --stage-timeout stops a stage that runs too long. A stage that fails or
times out is reported as such, the ones after it as not run. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.corpora import installed_texts, write_jsonl_corpus

ROOT = Path(__file__).resolve().parents[1]

PIPELINE = [sys.executable, "-m", "data_prep"]  # the prepare entry point (= retro-dist prepare) on every rank
STAGES = ("tokenize", "embed", "index", "neighbors", "shard")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_btl": "self,tcp",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}
BYTES_PER_TOKEN = 3.8  # first guess for byte-level BPE on this text; the large corpus uses the small run's ratio
SAMPLE_S = 0.2
PROJECT_TOKENS = 10e9
PROJECT_NODES = (1, 4, 16, 64)
SERIAL_BELOW = 1.2  # a 2-rank speed-up under this is projected as a serial stage
TARGET_MEMORY_GROWTH, TARGET_INDEX_BYTES, TARGET_SPEEDUP, TARGET_RECALL = 1.3, 64, 1.6, 0.9


@dataclass
class StageRun:
    stage: str
    status: str = "not run"  # ok | failed (rc N) | timeout | not run
    seconds: float | None = None  # the stage's own wall time from the manifest, else its process's
    process_seconds: float | None = None  # start to exit of the command, interpreter and mpirun start-up included
    peak_anon: int | None = None  # bytes of private memory (RssAnon), summed over the process tree
    peak_rss: int | None = None  # bytes resident (VmRSS: private + mapped files + shmem), summed over the tree
    error: str = ""


@dataclass
class Run:
    size: str
    ranks: int
    dataset: str
    corpus: dict[str, Any]
    stages: dict[str, StageRun] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        counts = self.manifest.get("counts", {})
        return sum(counts.get(split, {}).get("tokens", 0) for split in ("train", "val"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--sizes", type=float, nargs=2, default=(15e6, 150e6), metavar=("SMALL", "LARGE"),
                      help="corpus sizes in tokens (default: 15e6 150e6)")
    size.add_argument("--quick", action="store_const", dest="sizes", const=(1e6, 10e6), help="sizes 1e6 10e6")
    parser.add_argument("--work", type=Path, default=Path("/tmp/retro_prepare_scale"),
                        help="corpora, datasets and logs; corpora are reused across runs (default: %(default)s)")
    parser.add_argument("--out-json", type=Path, default=None, help="results as JSON (default: WORK/results.json)")
    parser.add_argument("--embedder", default="minilm-static",
                        help="the recommended CPU path (default: %(default)s); hash-256 for the lexical baseline")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--tokenizer-sample-mb", type=int, default=None,
                        help="default: half the small corpus, so both sizes train the same tokenizer")
    parser.add_argument("--tokenize-block-mb", type=int, default=None,
                        help="default: an eighth of the small corpus, so the small run has blocks for 2 ranks")
    parser.add_argument("--prepare-args", default="", help="more options for every prepare call, one string")
    parser.add_argument("--ranks-per-node", type=int, default=os.cpu_count() or 1,
                        help="ranks per node assumed by the projection (default: this machine's cores)")
    parser.add_argument("--stage-timeout", type=timeouts, default={},
                        help="seconds before a stage is killed: one number for every stage, or STAGE=S,... (e.g. "
                             "neighbors=300,default=3600)")
    parser.add_argument("--reuse-small", action="store_true",
                        help="take the small runs (1 and 2 ranks) from WORK/results.json instead of running them")
    return parser.parse_args()


def timeouts(text: str) -> dict[str, float]:
    """'300' -> every stage 300 s; 'neighbors=300,default=3600' -> per stage, `default` for the others."""
    if "=" not in text:
        return {"default": float(text)}
    pairs = dict(item.split("=", 1) for item in text.split(","))
    unknown = set(pairs) - {*STAGES, "default"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {', '.join(sorted(unknown))}: use {', '.join(STAGES)}")
    return {stage: float(value) for stage, value in pairs.items()}


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    memory_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(memory_kb / 2 ** 20, 1)}


def size_label(tokens: float) -> str:
    return f"{tokens / 1e6:g}M"


# corpus -----------------------------------------------------------------------------------------------------------

def ensure_corpus(work: Path, label: str, target_bytes: int) -> dict[str, Any]:
    """The corpus directory work/corpus-LABEL holding about target_bytes of text, built unless a finished one with
    the same target is there (its record, work/corpus-LABEL.json, is written last)."""
    directory, record = work / f"corpus-{label}", work / f"corpus-{label}.json"
    if record.exists():
        info = json.loads(record.read_text())
        if info["target_bytes"] == target_bytes and directory.is_dir():
            return info
        record.unlink()  # before the directory changes, so an interrupted build is never taken for a finished one
    shutil.rmtree(directory, ignore_errors=True)
    log(f"building corpus {directory} ({target_bytes / 1e6:.0f} MB of text)")
    start = time.perf_counter()
    stats = write_jsonl_corpus(directory, (text for _, text in installed_texts()), max_bytes=target_bytes)
    info = {"path": str(directory), "target_bytes": target_bytes, **stats,
            "exhausted": stats["text_bytes"] < target_bytes, "build_s": round(time.perf_counter() - start, 1)}
    record.write_text(json.dumps(info, indent=1))
    return info


def corpus_bytes(tokens: float, bytes_per_token: float) -> int:
    return math.ceil(tokens * bytes_per_token / 1e6) * 1_000_000  # whole MB, so a rerun finds the same corpus


# running the pipeline -----------------------------------------------------------------------------------------------

def pipeline_flags() -> set[str]:
    """The options the current pipeline accepts (its --help), so the bench passes only those."""
    result = subprocess.run([*PIPELINE, "--help"], cwd=ROOT, capture_output=True, text=True)
    return set(re.findall(r"--[a-z][a-z0-9-]*", result.stdout))


def prepare_options(args: argparse.Namespace, flags: set[str], small_bytes: int) -> list[str]:
    small_mb = small_bytes / 1e6
    wanted = {"--embedder": args.embedder, "--seq-len": args.seq_len, "--chunk-size": args.chunk_size,
              "--vocab-size": args.vocab_size,
              "--tokenizer-sample-mb": args.tokenizer_sample_mb or max(1, int(small_mb // 2)),
              "--tokenize-block-mb": args.tokenize_block_mb or max(1, round(small_mb / 8))}
    options = []
    for flag, value in wanted.items():
        if flag in flags:
            options += [flag, str(value)]
        else:
            log(f"the pipeline has no {flag}: not passed")
    return options + shlex.split(args.prepare_args)


def process_tree(root: int) -> list[int]:
    """root and all its descendants, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def tree_memory(pids: list[int]) -> tuple[int, int]:
    """(RssAnon, VmRSS) in bytes, summed over pids."""
    anon = rss = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(re.findall(r"^(RssAnon|VmRSS):\s+(\d+) kB", status, re.M))
        anon += int(fields.get("RssAnon", 0)) * 1024
        rss += int(fields.get("VmRSS", 0)) * 1024
    return anon, rss


def run_watched(cmd: list[str], env: dict[str, str], log_path: Path, *, cpu: int | None,
                timeout: float | None) -> tuple[str, float, int, int]:
    """Run cmd (pinned to one cpu, unless None), sampling its tree's memory. Returns (status, seconds, peak RssAnon,
    peak VmRSS)."""
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    start = time.perf_counter()
    peak_anon = peak_rss = 0
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=pin,
                                start_new_session=True)
        try:
            while proc.poll() is None:
                anon, rss = tree_memory(process_tree(proc.pid))
                peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss)
                if timeout is not None and time.perf_counter() - start > timeout:
                    stop_group(proc)
                    return "timeout", time.perf_counter() - start, peak_anon, peak_rss
                time.sleep(SAMPLE_S)
        except BaseException:  # Ctrl-C: the stage runs in its own session, so stop it too
            stop_group(proc)
            raise
    status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
    return status, time.perf_counter() - start, peak_anon, peak_rss


def stop_group(proc: subprocess.Popen) -> None:
    """Stop the stage's whole process group (mpirun and its ranks): TERM, then KILL after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def last_error(log_path: Path) -> str:
    """The line of a failed stage's log that says why: the last one naming an error, else the last one."""
    lines = [line.strip() for line in re.split(r"[\r\n]", log_path.read_text(errors="replace")) if line.strip()]
    named = [line for line in lines if re.search(r"error|exception", line, re.I)]
    return (named or lines or [""])[-1][:300].replace("|", "/")  # it goes into a markdown table


def run_pipeline(work: Path, size: str, corpus: dict[str, Any], ranks: int, options: list[str],
                 timeouts: dict[str, float]) -> Run:
    """Every stage of a fresh dataset, each as its own process; after a failed stage the rest are not run."""
    dataset = work / f"ds-{size}-{ranks}rank"
    shutil.rmtree(dataset, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run = Run(size=size, ranks=ranks, dataset=str(dataset), corpus=corpus)
    launcher = [shutil.which("mpirun") or "mpirun", "-np", str(ranks)] if ranks > 1 else []
    env = {**os.environ, **ONE_THREAD, **MPI_ENV}
    cpu = min(os.sched_getaffinity(0)) if ranks == 1 else None  # one rank, one core: fair beside 2 ranks on 2
    failed = False
    for stage in STAGES:
        result = run.stages[stage] = StageRun(stage)
        if failed:
            continue
        cmd = [*launcher, *PIPELINE, "--input", corpus["path"], "--out", str(dataset), "--stage", stage, *options]
        log_path = logs / f"{dataset.name}-{stage}.log"
        timeout = timeouts.get(stage, timeouts.get("default"))
        status, seconds, anon, rss = run_watched(cmd, env, log_path, cpu=cpu, timeout=timeout)
        run.manifest = read_manifest(dataset)
        own = run.manifest.get("stages", {}).get(stage, {}).get("wall_time_s")
        result.status, result.process_seconds, result.peak_anon, result.peak_rss = status, seconds, anon, rss
        result.seconds = own if status == "ok" and own is not None else seconds
        if status == "timeout":
            rate = last_rate(log_path)
            result.error = f"killed after {timeout:g} s" + (f", progressing at {rate} on rank 0" if rate else "")
        elif status != "ok":
            result.error = last_error(log_path)
        failed = status != "ok"
        log(f"{size} {ranks} rank(s) {stage}: {status} in {result.seconds:.1f} s, peak anon {gb(anon)}, "
            f"rss {gb(rss)}" + (f": {result.error}" if result.error else ""))
    return run


def last_rate(log_path: Path) -> str | None:
    """The last rate a progress bar printed in the log (e.g. '186query/s'), or None."""
    rates = re.findall(r"([0-9.]+[kM]?(?:query|chunk|vec|B|it)/s)", log_path.read_text(errors="replace"))
    return rates[-1] if rates else None


def load_runs(path: Path) -> list[Run]:
    """The runs of an earlier results JSON."""
    runs = []
    for raw in json.loads(path.read_text())["runs"]:
        stages = {name: StageRun(**stage) for name, stage in raw.pop("stages").items()}
        runs.append(Run(**raw, stages=stages))
    return runs


def read_manifest(dataset: Path) -> dict[str, Any]:
    try:
        return json.loads((dataset / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


# measures ---------------------------------------------------------------------------------------------------------

def stage_work(run: Run) -> dict[str, tuple[int, str]]:
    """What each stage processes, for its throughput: tokens, or chunks (database chunks for the index)."""
    counts = run.manifest.get("counts", {})
    chunks = sum(counts.get(split, {}).get("chunks", 0) for split in ("train", "val"))
    db = counts.get("train", {}).get("chunks", 0)
    return {"tokenize": (run.tokens, "tok"), "embed": (chunks, "chunk"), "index": (db, "chunk"),
            "neighbors": (chunks, "chunk"), "shard": (run.tokens, "tok")}


def index_size(run: Run) -> int | None:
    """Bytes of the index: the manifest's `index.bytes` if recorded, else db/index.* (index.faiss, index.ivfdata)."""
    recorded = run.manifest.get("index", {}).get("bytes")
    if isinstance(recorded, int):
        return recorded
    files = list((Path(run.dataset) / "db").glob("index.*"))
    return sum(f.stat().st_size for f in files) if files else None


def bytes_per_token(run: Run) -> float | None:
    return run.corpus["text_bytes"] / run.tokens if run.tokens else None


def speedups(one: Run, two: Run | None) -> dict[str, float | None]:
    result = {}
    for stage in STAGES:
        a, b = one.stages[stage], two.stages[stage] if two else None
        ok = b is not None and a.status == b.status == "ok" and b.seconds
        result[stage] = a.seconds / b.seconds if ok else None
    return result


def growth(a: float | None, b: float | None) -> float | None:
    return b / a if a and b is not None else None


# report -----------------------------------------------------------------------------------------------------------

def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def gb(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def secs(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "NO")


def stage_table(runs: list[Run]) -> str:
    rows = []
    for stage in STAGES:
        for run in runs:
            r = run.stages[stage]
            count, unit = stage_work(run)[stage]
            rate = f"{count / r.seconds:,.0f} {unit}/s" if r.status == "ok" and count and r.seconds else "n/a"
            status = r.status + (f": {r.error}" if r.error else "")
            corpus = f"{run.size} ({run.tokens / 1e6:.1f}M tok)" if run.tokens else run.size
            rows.append([stage, corpus, secs(r.seconds), rate, gb(r.peak_anon), gb(r.peak_rss), status])
    return markdown(["stage", "corpus", "time", "throughput", "peak private (RssAnon)",
                     "peak RSS (incl. mapped files)", "status"], rows)


def growth_table(small: Run, large: Run) -> str:
    linear = growth(small.tokens, large.tokens)
    rows = []
    for stage in STAGES:
        a, b = small.stages[stage], large.stages[stage]
        ok = a.status == b.status == "ok"
        time_x = growth(a.seconds, b.seconds) if ok else None
        anon_x = growth(a.peak_anon, b.peak_anon) if ok else None
        time_ok = None if time_x is None or linear is None else time_x <= linear
        memory_ok = None if anon_x is None or stage == "index" else anon_x <= TARGET_MEMORY_GROWTH
        memory_target = "index: see bytes/chunk" if stage == "index" else f"<= {TARGET_MEMORY_GROWTH}x"
        rows.append([stage, times(time_x), times(linear), mark(time_ok), times(anon_x), memory_target,
                     mark(memory_ok), times(growth(a.peak_rss, b.peak_rss) if ok else None)])
    return markdown(["stage", "time growth", "linear (tokens)", "<= linear", "private memory growth", "target",
                     "meets", "RSS growth"], rows)


def index_table(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        index = run.manifest.get("index", {})
        factory, vectors, size = index.get("factory"), index.get("vectors"), index_size(run)
        per_chunk = index.get("bytes_per_chunk") or (size / vectors if size and vectors else None)
        compressed = factory is not None and ("PQ" in factory or "SQ" in factory)
        rows.append([run.size, str(factory or "n/a"), f"{vectors:,}" if vectors else "n/a",
                     gb(size), f"{per_chunk:,.1f}" if per_chunk else "n/a",
                     "n/a" if factory is None else ("yes" if compressed else "no"),
                     mark(per_chunk <= TARGET_INDEX_BYTES) if compressed and per_chunk else "n/a (not compressed)"])
    return markdown(["corpus", "factory", "chunks", "index bytes", "bytes/chunk", "compressed (PQ/SQ)",
                     f"<= {TARGET_INDEX_BYTES} B/chunk"], rows)


def recall_table(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        index = run.manifest.get("index", {})
        recall = index.get("recall_at_10")
        params = ", ".join(f"{k}={v}" for k, v in index.items()
                           if k not in ("factory", "file", "vectors", "recall_at_10", "bytes", "bytes_per_chunk"))
        rows.append([run.size, str(index.get("factory", "n/a")),
                     "n/a" if recall is None else f"{recall:.3f}", params or "n/a",
                     mark(None if recall is None else recall >= TARGET_RECALL)])
    return markdown(["corpus", "factory", "recall@10", "search parameters (manifest)", f">= {TARGET_RECALL}"], rows)


def speedup_table(one: Run, two: Run | None) -> str:
    rows = []
    for stage, s in speedups(one, two).items():
        b = two.stages[stage] if two else StageRun(stage)
        rows.append([stage, secs(one.stages[stage].seconds), secs(b.seconds), times(s),
                     mark(None if s is None else s >= TARGET_SPEEDUP), gb(one.stages[stage].peak_anon),
                     gb(b.peak_anon), b.status])
    return markdown(["stage", "1 rank", "2 ranks", "speed-up", f">= {TARGET_SPEEDUP}x", "private memory 1 rank",
                     "private memory 2 ranks (both)", "2-rank status"], rows)


def same_output(one: Run, two: Run | None) -> str:
    if two is None or not one.manifest.get("shards") or not two.manifest.get("shards"):
        return "n/a"
    return "yes" if one.manifest["shards"] == two.manifest["shards"] else "NO"


def projection(small: Run, large: Run, speedup: dict[str, float | None], ranks_per_node: int) -> dict[str, Any]:
    """Per stage: hours for PROJECT_TOKENS on each node count, and private memory per rank. Time scales with tokens
    from the large run, divided by ranks at the measured 2-rank efficiency (a stage under SERIAL_BELOW is serial).
    Memory is the large run's where it met the growth target (bounded), else extrapolated linearly in tokens."""
    scale = PROJECT_TOKENS / large.tokens if large.tokens else None
    stages = {}
    for stage in STAGES:
        a, b = small.stages[stage], large.stages[stage]
        if b.status != "ok" or scale is None:
            stages[stage] = None
            continue
        s = speedup.get(stage)
        serial = s is not None and s < SERIAL_BELOW
        efficiency = 1.0 if s is None else min(1.0, s / 2)
        hours = {n: b.seconds * scale / (1 if serial else n * ranks_per_node * efficiency) / 3600
                 for n in PROJECT_NODES}
        bounded = (a.status != "ok" or large.tokens <= small.tokens
                   or b.peak_anon <= TARGET_MEMORY_GROWTH * a.peak_anon)
        slope = 0.0 if bounded else (b.peak_anon - a.peak_anon) / (large.tokens - small.tokens)
        memory = b.peak_anon + slope * (PROJECT_TOKENS - large.tokens)
        stages[stage] = {"hours": hours, "memory_per_rank": memory, "memory_bounded": bounded, "serial": serial,
                         "efficiency": None if s is None else efficiency}
    return stages


def index_projection(large: Run) -> str:
    """The index file at PROJECT_TOKENS, from the large run's bytes per chunk: each node's ranks map it once."""
    size, vectors = index_size(large), large.manifest.get("index", {}).get("vectors")
    if not size or not vectors:
        return ""
    chunks = PROJECT_TOKENS / large.manifest.get("chunk_size", 64)
    return (f"At {size / vectors:.0f} bytes/chunk ({large.manifest['index'].get('factory')}), the index of "
            f"{chunks / 1e6:.0f}M chunks takes {gb(size / vectors * chunks)}. ")


def projection_table(stages: dict[str, Any]) -> str:
    rows = []
    for stage, p in stages.items():
        if p is None:
            rows.append([stage, "n/a", "n/a", "n/a", *["n/a"] * len(PROJECT_NODES)])
            continue
        scaling = "serial" if p["serial"] else ("assumed 100%" if p["efficiency"] is None
                                                else f"{p['efficiency']:.0%} efficient")
        memory_model = "bounded: as measured" if p["memory_bounded"] else "grows: linear"
        rows.append([stage, scaling, gb(p["memory_per_rank"]), memory_model,
                     *(f"{p['hours'][n]:.2f}" for n in PROJECT_NODES)])
    done = [p for p in stages.values() if p]
    if len(done) == len(stages):
        rows.append(["total", "", "", "", *(f"{sum(p['hours'][n] for p in done):.2f}" for n in PROJECT_NODES)])
    return markdown(["stage", "scaling", "private memory per rank", "memory model",
                     *(f"hours on {n} node{'s' * (n > 1)}" for n in PROJECT_NODES)], rows)


def report(info: dict[str, Any], small: Run, two: Run | None, large: Run, proj: dict[str, Any]) -> str:
    m, opts = info["machine"], " ".join(info["options"])
    short = [run.corpus for run in (small, large) if run.corpus["exhausted"]]
    bpt = bytes_per_token(small)
    text = [f"# data_prep at two corpus sizes\n\nMachine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB. "
            f"Options of every prepare call: `{opts}`. One thread per rank (OMP/RAYON/MKL_NUM_THREADS=1); a 1-rank "
            f"run is pinned to one core. --tokenizer-sample-mb is half the small corpus, so both sizes train the same "
            f"tokenizer on the same text; --tokenize-block-mb an eighth of it, so the small run has blocks for 2 "
            f"ranks.\n",
            "Corpora (installed packages' sources and docs, then system documentation; JSON-lines, deduplicated): "
            + "; ".join(f"{run.size}: {run.corpus['text_bytes'] / 1e6:.0f} MB of text, {run.corpus['documents']:,} "
                        f"documents, {run.tokens:,} tokens" for run in (small, large))
            + (f"; {bpt:.2f} bytes/token measured on the small run." if bpt else "."),
            *([f"**Corpus short:** the installed text ran out at {c['text_bytes'] / 1e6:.0f} MB of the "
               f"{c['target_bytes'] / 1e6:.0f} MB wanted: the larger size is smaller than asked (no text is "
               f"repeated)." for c in short]),
            "\n## 1. Per stage, 1 rank\n", stage_table([small, large]),
            "\nPrivate memory (RssAnon) is what the stage itself holds; RSS adds the file pages it has mapped "
            "(memory-mapped .npy and index files): page cache, which the kernel drops under memory pressure and which "
            "ranks of one node share. Both are summed over the process tree (mpirun and every rank), sampled every "
            f"{SAMPLE_S} s. Time is the stage's own wall time from the manifest (the process's if it failed).\n",
            f"### Growth {large.size} / {small.size} (theory: time grows linearly, private memory <= "
            f"{TARGET_MEMORY_GROWTH}x)\n", growth_table(small, large),
            "\nTimes on a shared box are noisy: read a growth a little over linear as linear.\n",
            "### Index size\n", index_table([small, large]),
            "\n## 2. Recall@10 against exact search (recorded by the index stage)\n", recall_table([small, large]),
            f"\n## 3. Speed-up from 1 to 2 ranks, measured at {small.size} tokens ({small.tokens:,})\n",
            speedup_table(small, two) if two else "not measured: mpirun not found",
            f"\nOutputs of 1 and 2 ranks identical (shard sha256 in the manifest): {same_output(small, two)}.\n",
            f"## 4. Projection for {PROJECT_TOKENS / 1e9:g}B tokens, {info['ranks_per_node']} ranks per node, "
            f"embedder {info['embedder']}\n", projection_table(proj),
            f"\nFrom the {large.size} 1-rank time per token, divided by the ranks at the 2-rank efficiency measured "
            f"above (speed-up / 2), i.e. assuming linear scaling in ranks; a stage whose 2-rank speed-up is under "
            f"{SERIAL_BELOW}x is projected as serial. Private memory per rank: as measured at {large.size} where it "
            f"grew at most {TARGET_MEMORY_GROWTH}x (bounded), else extrapolated linearly in tokens from the two "
            f"sizes. {index_projection(large)}The embed hours are for {info['embedder']}; a neural embedder is far "
            f"slower."]
    return "\n".join(text)


def log(message: str) -> None:
    print(f"[prepare_scale] {message}", file=sys.stderr, flush=True)


def main() -> None:
    args = parse_args()
    small_tokens, large_tokens = sorted(args.sizes)
    if large_tokens < 10 * small_tokens:
        log(f"sizes {small_tokens:g} and {large_tokens:g} are less than 10x apart")
    args.work.mkdir(parents=True, exist_ok=True)
    small_label, large_label = size_label(small_tokens), size_label(large_tokens)
    small_corpus = ensure_corpus(args.work, small_label, corpus_bytes(small_tokens, BYTES_PER_TOKEN))
    options = prepare_options(args, pipeline_flags(), small_corpus["text_bytes"])
    if args.reuse_small:
        earlier = {(run.size, run.ranks): run for run in load_runs(args.work / "results.json")}
        small, two = earlier[(small_label, 1)], earlier.get((small_label, 2))
        log(f"small runs taken from {args.work / 'results.json'}")
    else:
        small = run_pipeline(args.work, small_label, small_corpus, 1, options, args.stage_timeout)
        two = (run_pipeline(args.work, small_label, small_corpus, 2, options, args.stage_timeout)
               if shutil.which("mpirun") else None)
    # 3% more text than the small run's ratio asks for: the later documents (man pages, changelogs) differ in ratio
    large_corpus = ensure_corpus(args.work, large_label,
                                 corpus_bytes(large_tokens * 1.03, bytes_per_token(small) or BYTES_PER_TOKEN))
    large = run_pipeline(args.work, large_label, large_corpus, 1, options, args.stage_timeout)
    info = {"machine": machine(), "options": options, "ranks_per_node": args.ranks_per_node,
            "embedder": args.embedder}
    proj = projection(small, large, speedups(small, two), args.ranks_per_node)
    print(report(info, small, two, large, proj))
    out_json = args.out_json or args.work / "results.json"
    runs = [dataclasses.asdict(run) for run in (small, two, large) if run]
    out_json.write_text(json.dumps({**info, "runs": runs, "speedup": speedups(small, two), "projection": proj},
                                   indent=1, default=str))
    log(f"results in {out_json}, logs in {args.work / 'logs'}")


if __name__ == "__main__":
    main()
