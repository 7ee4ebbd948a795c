"""What a training run leaves in its directory, written by rank 0 alone.

    RUN_DIR/config.json   the resolved TrainConfig
    RUN_DIR/log.jsonl     one JSON record per logged step / evaluation; a resumed run *appends*, so
                          readers keep the last record of each (step, kind)
    RUN_DIR/samples.txt   periodic samples from a fixed prompt and a seeded generator
    RUN_DIR/checkpoints/  see checkpoint.py
    RUN_DIR/previous-YYYYmmdd-HHMMSS/  log.jsonl, samples.txt, config.json of an earlier run that a new
                          (not resumed) run found there: moved aside, never deleted
    RUN_DIR/tensorboard/  TensorBoard event files (``--log-to tensorboard``)
    RUN_DIR/wandb_id      the W&B run id, so ``--resume`` continues that run (``--log-to wandb``; W&B's
                          own files go to ``$WANDB_DIR`` or else ``RUN_DIR/wandb/``)

(The README's run-directory table says the same for users.)
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path

from gpt2repro import checkpoint as ckpt_io
from gpt2repro.files import atomic_write, user_error_for
from gpt2repro.tracking import Trackers
from gpt2repro.train_config import TrainConfig

log = logging.getLogger("gpt2repro")

EARLIER_RUN_FILES = ("log.jsonl", "samples.txt", "config.json")


class RunWriter:
    """Rank 0's files in RUN_DIR; every method is a no-op on other ranks."""

    def __init__(self, out: Path, active: bool):
        self.out, self.active = out, active
        self.trackers = Trackers()

    def start(self, cfg: TrainConfig, resumed: bool, step: int = 0) -> None:
        """Create RUN_DIR and write config.json. A new run never deletes what an earlier one left
        (log.jsonl, samples.txt, config.json of a run that never saved a checkpoint, or another tool's):
        those files are moved into ``RUN_DIR/previous-YYYYmmdd-HHMMSS/`` and the move is logged.
        ``step``: where a resumed run continues from (its checkpoint's step), for the trackers."""
        if not self.active:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            if not resumed:
                self._move_aside_earlier_files()
            atomic_write(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        except OSError as e:
            raise user_error_for(e, "write the run directory", e.filename or self.out) from e
        stale = ckpt_io.remove_partial_writes(self.out)
        if stale:
            log.info("removed %d partial checkpoint write(s) of an interrupted run", len(stale))
        self.trackers = Trackers.open(cfg, self.out, step if resumed else None, self.active)

    def _move_aside_earlier_files(self) -> None:
        earlier = [self.out / n for n in EARLIER_RUN_FILES if (self.out / n).is_file()]
        if not any(p.name != "config.json" for p in earlier):
            return  # a config.json alone (a run stopped before its first step) holds nothing to lose
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        aside = self.out / f"previous-{stamp}"
        suffix = 1
        while aside.exists():
            suffix += 1
            aside = self.out / f"previous-{stamp}-{suffix}"
        aside.mkdir()
        for path in earlier:
            os.replace(path, aside / path.name)
        log.info(
            "%s held files of an earlier run (%s): moved them to %s (a new run deletes nothing)",
            self.out,
            ", ".join(p.name for p in earlier),
            aside,
        )

    def record(self, rec: dict) -> None:
        if self.active:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            self.trackers.log(rec)

    def samples(self, step: int, texts: list[str]) -> None:
        if self.active:
            with open(self.out / "samples.txt", "a") as f:
                f.write(f"=== step {step}\n" + "".join(f"--- {t}\n" for t in texts))
            self.trackers.text(step, texts)

    def close(self) -> None:
        """Flush and close the trackers (log.jsonl and samples.txt are closed after every write)."""
        self.trackers.close()
