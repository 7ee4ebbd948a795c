"""Stopping on a scheduler's signal without losing work: SIGTERM, SIGUSR1 (SLURM's ``--signal``), SIGINT.

The first signal only raises a flag: the current optimizer step finishes, all ranks agree on the step to
stop at (an all-reduce of the flag after every step), a checkpoint is written, and the process exits with
``EXIT_PREEMPTED`` after printing the command that resumes the run. A second signal exits at once.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — the run is resumable
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):  # noqa: N818 - not an error: the run stopped on request, resumable
    """Raised after the checkpoint of a signalled stop; the CLI prints it and exits ``EXIT_PREEMPTED``."""


class StopSignals:
    """While entered, the stop signals set ``received`` (a signal number) instead of killing the process."""

    def __init__(self) -> None:
        self.received: int = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received:  # the second signal: no more waiting
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        print(
            f"gpt2repro train: {signal.Signals(signum).name} received: stopping after this step "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that continues this run: the same arguments with ``--resume auto``, under
    torchrun with the same process layout when launched by it."""
    args = list(sys.argv[1:] if argv is None else argv)
    cleaned: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == "--resume":
            nxt = args[i + 1] if i + 1 < len(args) else ""
            skip = bool(nxt) and not nxt.startswith("-")
            continue
        if arg.startswith("--resume="):
            continue
        cleaned.append(arg)
    cmd = ["gpt2repro", *cleaned, "--resume", "auto"]
    if "LOCAL_WORLD_SIZE" in os.environ and "RANK" in os.environ:
        nodes = int(os.environ.get("WORLD_SIZE", "1")) // max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
        launcher = ["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"]
        if nodes > 1:
            launcher.append(f"--nnodes={nodes}")
        cmd = [*launcher, "-m", *cmd]
    return shlex.join(cmd)
