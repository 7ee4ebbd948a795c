"""Experiment trackers beside ``log.jsonl``: TensorBoard event files and Weights & Biases (rank 0 only).

``--log-to tensorboard`` writes ``RUN_DIR/tensorboard/``; ``--log-to wandb`` starts a W&B run (``WANDB_MODE=
offline`` works without an account; files under ``$WANDB_DIR`` or else ``RUN_DIR/wandb/``) whose id is kept
in ``RUN_DIR/wandb_id``. Both get the same numbers as ``log.jsonl``, against the optimizer step.

A resumed run continues the same curves: the trainer logs again the steps after its checkpoint, so
TensorBoard purges the old run's events from that step on (``SummaryWriter(purge_step=...)``), and W&B,
resumed under the saved id, is not sent the steps it already holds.
Both packages are optional extras (``pip install 'gpt2repro[tensorboard]'`` / ``'gpt2repro[wandb]'``).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
from pathlib import Path

from gpt2repro.errors import UserError, first_line
from gpt2repro.files import atomic_write
from gpt2repro.train_config import TrainConfig

log = logging.getLogger("gpt2repro")

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id"

# log.jsonl key -> tracker tag (grouped the way TensorBoard and W&B lay out sections); other numeric keys
# keep their own name.
TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "mfu": "perf/mfu",
    "dt": "perf/step_time_s",
    "tokens": "progress/tokens",
    "elapsed": "progress/elapsed_s",
    "hellaswag_acc": "hellaswag/acc",
    "hellaswag_acc_norm": "hellaswag/acc_norm",
    "cuda_max_allocated_mib": "memory/cuda_max_allocated_mib",
    "cuda_max_reserved_mib": "memory/cuda_max_reserved_mib",
    "cpu_rss_mib": "memory/cpu_rss_mib",
    "cpu_peak_rss_mib": "memory/cpu_peak_rss_mib",
}
# An eval record repeats the step's tokens and elapsed time: trackers take them from the train record only,
# so no curve gets two points at one step.
PROGRESS_KEYS = ("tokens", "elapsed")


def tracker_values(record: dict) -> dict[str, float]:
    """The tags and values a log record gives the trackers (numbers only; the step is the x axis)."""
    train = "train_loss" in record
    values = {}
    for key, value in record.items():
        if key == "step" or (key in PROGRESS_KEYS and not train):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        values[TAGS.get(key, key)] = value
    return values


def _missing(package: str, extra: str) -> UserError:
    return UserError(f"--log-to {extra} needs the {package} package: pip install 'gpt2repro[{extra}]'")


class _TensorBoard:
    """``RUN_DIR/tensorboard/`` event files: scalars, samples as text, the config as hparams and text."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resumed_at_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError as e:
            raise _missing("tensorboard", "tensorboard") from e
        # TensorBoard hides every older event from this step on: a resumed run's own steps after its
        # checkpoint, or all of an earlier run a fresh one replaces in the same directory
        purge = 0 if resumed_at_step is None else resumed_at_step + 1
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge, flush_secs=30)
        config = cfg.to_dict()
        if resumed_at_step is None:
            for summary in hparams(config, {"loss/val": 0.0, "loss/train": 0.0}):
                self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", purge)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, step: int, texts: list[str]) -> None:
        self.writer.add_text("samples", "\n\n".join(f"```\n{t}\n```" for t in texts), step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A W&B run: the config, every scalar against the step, samples as a table; resumed by its saved id."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resumed_at_step: int | None):
        try:
            import wandb
        except ImportError as e:
            raise _missing("wandb", "wandb") from e
        self.wandb = wandb
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed_at_step is not None and id_file.is_file() else None
        try:
            self.run = wandb.init(
                project=cfg.wandb_project,
                name=cfg.wandb_run_name or run_dir.resolve().name,
                id=run_id,
                resume="allow" if run_id else None,
                config=cfg.to_dict(),
                dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            )
            self.run.config.update(cfg.to_dict(), allow_val_change=True)  # e.g. a longer max_steps
        except Exception as e:  # no API key, no network, a bad project name: W&B's own words, one line
            raise UserError(
                f"W&B could not start a run ({first_line(e, 200)}); run `wandb login`, or set "
                "WANDB_MODE=offline and `wandb sync` the run later"
            ) from e
        if run_id is None:
            atomic_write(id_file, self.run.id + "\n")
        elif self.run.id != run_id:
            raise UserError(f"W&B resumed run {self.run.id}, not {run_id} of {id_file}")
        self.first_new_step = self.run.step  # a resumed online run already holds the steps before this
        log.info("W&B run %s (project %s)", self.run.id, cfg.wandb_project)

    def log(self, step: int, values: dict[str, float]) -> None:
        if step >= self.first_new_step:
            self.run.log(values, step=step)

    def text(self, step: int, texts: list[str]) -> None:
        if step >= self.first_new_step:
            table = self.wandb.Table(columns=["step", "sample"], data=[[step, t] for t in texts])
            self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB}


class Trackers:
    """The trackers of one run (none, one or both); a no-op where none is open (and on ranks > 0)."""

    def __init__(self, backends: list | None = None):
        self.backends = backends or []

    @classmethod
    def open(cls, cfg: TrainConfig, run_dir: Path, resumed_at_step: int | None, active: bool) -> Trackers:
        """Start ``cfg.log_to``'s trackers; ``resumed_at_step`` is the checkpoint's step of a resumed run."""
        if not active:
            return cls()
        backends = []
        try:
            for name in cfg.log_targets:
                backends.append(BACKENDS[name](cfg, Path(run_dir), resumed_at_step))
        except BaseException:
            cls(backends).close()
            raise
        trackers = cls(backends)
        if backends:  # a run that dies with an error still flushes what it logged
            atexit.register(trackers.close)
        return trackers

    def log(self, record: dict) -> None:
        """One ``log.jsonl`` record (train or eval) at its ``step``."""
        if self.backends:
            values = tracker_values(record)
            for backend in self.backends:
                backend.log(record["step"], values)

    def text(self, step: int, texts: list[str]) -> None:
        for backend in self.backends:
            backend.text(step, texts)

    def close(self) -> None:
        """Flush and close every tracker (idempotent)."""
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close()
