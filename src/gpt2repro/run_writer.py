"""What a training run leaves in its directory, written by rank 0 alone.

    RUN_DIR/config.json   the resolved TrainConfig
    RUN_DIR/log.jsonl     one JSON record per logged step / evaluation; a resumed run *appends*, so
                          readers keep the last record of each (step, kind)
    RUN_DIR/samples.txt   periodic samples from a fixed prompt and a seeded generator
    RUN_DIR/checkpoints/  see checkpoint.py
    RUN_DIR/tensorboard/  TensorBoard event files (``--log-to tensorboard``)
    RUN_DIR/wandb_id      the W&B run id, so ``--resume`` continues that run (``--log-to wandb``; W&B's
                          own files go to ``$WANDB_DIR`` or else ``RUN_DIR/wandb/``)

(The README's run-directory table says the same for users.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gpt2repro import checkpoint as ckpt_io
from gpt2repro.tracking import Trackers
from gpt2repro.train_config import TrainConfig

log = logging.getLogger("gpt2repro")


class RunWriter:
    """Rank 0's files in RUN_DIR; every method is a no-op on other ranks."""

    def __init__(self, out: Path, active: bool):
        self.out, self.active = out, active
        self.trackers = Trackers()

    def start(self, cfg: TrainConfig, resumed: bool, step: int = 0) -> None:
        """``step``: where a resumed run continues from (its checkpoint's step)."""
        if not self.active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if not resumed:
            for name in ("log.jsonl", "samples.txt"):
                (self.out / name).unlink(missing_ok=True)
        stale = ckpt_io.remove_partial_writes(self.out)
        if stale:
            log.info("removed %d partial checkpoint write(s) of an interrupted run", len(stale))
        self.trackers = Trackers.open(cfg, self.out, step if resumed else None, self.active)

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
