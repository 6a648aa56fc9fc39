"""Ranks exit when their launcher dies.

torchrun and the deepspeed launcher start each rank in its own process group, so a SIGKILL to the launcher alone
(an OOM kill, `kill -9` of the job's leader) reaches no rank: they kept training and pruning checkpoints, and a
relaunch on the same run directory crashed in DeepSpeed. A daemon thread polls os.getppid(): when the launcher
dies the rank is re-parented (to init or a subreaper), its parent pid changes, and the rank exits with one line.

Only ranks started by a launcher are watched: a `retro-dist train` started from a shell (under nohup, say) must not
die with that shell.
"""

from __future__ import annotations

import os
import sys
import threading
import time

LAUNCHER_DIED_EXIT_CODE = 143  # as if SIGTERM-ed: the job is gone, nothing was saved since the last checkpoint


def watch_parent(launcher: str, *, poll_s: float = 1.0) -> threading.Thread | None:
    """Start the watchdog when `launcher` (retro_dist.dist's name: torch, slurm, mpi, single) started this rank."""
    if launcher == "single":
        return None
    parent = os.getppid()
    if parent == 1:  # already orphaned (or started by init): there is no launcher to watch
        return None
    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                print(f"retro-dist: the {launcher} launcher (pid {parent}) died: rank {os.environ.get('RANK', '?')} "
                      f"exits; relaunch to resume from the last checkpoint", file=sys.stderr, flush=True)
                os._exit(LAUNCHER_DIED_EXIT_CODE)  # the main thread may sit in a collective that never returns

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
