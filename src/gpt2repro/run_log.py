"""Reading ``RUN_DIR/log.jsonl`` as the trainer writes it, for ``gpt2repro plot``.

It works on a run that is still going (a half written last line is skipped) and on resumed runs (the log is
appended to; the last record of each (step, kind) wins, as after a resume the steps since the checkpoint are
logged again).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from gpt2repro.errors import UserError
from gpt2repro.files import user_error_for

log = logging.getLogger("gpt2repro")

LOG_NAME = "log.jsonl"

# log.jsonl's memory columns in MiB (runtime.memory_stats; a test keeps both in step) -> label, line style
MEMORY_LINES = {
    "cuda_max_allocated_mib": ("CUDA peak allocated", "-"),
    "cuda_max_reserved_mib": ("CUDA peak reserved", "--"),
    "cpu_rss_mib": ("CPU RSS", "-."),
    "cpu_peak_rss_mib": ("CPU peak RSS", ":"),
}
TRAIN_FIELDS = ("train_loss", "lr", "grad_norm", "dt", "tokens_per_s", "mfu", *MEMORY_LINES)
EVAL_FIELDS = ("val_loss", "hellaswag_acc", "hellaswag_acc_norm")


@dataclass
class Series:
    """One kind of record of a run, sorted by step: ``columns[name][i]`` belongs to ``steps[i]``."""

    steps: list[int] = field(default_factory=list)
    columns: dict[str, list[float | None]] = field(default_factory=dict)

    def get(self, name: str) -> tuple[list[int], list[float]]:
        """Steps and finite values of one column (records that lack it, or hold NaN/inf, left out)."""
        xs, ys = [], []
        for step, value in zip(self.steps, self.columns.get(name, []), strict=True):
            if value is not None and math.isfinite(value):
                xs.append(step)
                ys.append(value)
        return xs, ys

    def by_tokens(self, name: str) -> tuple[list[float], list[float]]:
        """Like ``get`` but against the tokens processed at each step."""
        tokens = dict(zip(self.steps, self.columns["tokens"], strict=True))
        pairs = [(tokens[s], v) for s, v in zip(*self.get(name), strict=True) if tokens[s] is not None]
        return [t for t, _ in pairs], [v for _, v in pairs]

    def has(self, name: str) -> bool:
        return bool(self.get(name)[0])


@dataclass
class RunLog:
    """What ``plot`` needs of one run directory."""

    run_dir: Path
    name: str
    train: Series
    evals: Series
    fineweb_edu: bool
    skipped_lines: int = 0


def _record_kinds(record: dict) -> list[str]:
    """A record is a training record, an eval record, or (if a trainer merges them) both."""
    kind = record.get("kind")
    if isinstance(kind, str):
        return [kind]
    kinds = []
    if "train_loss" in record:
        kinds.append("train")
    if any(k in record for k in EVAL_FIELDS):
        kinds.append("eval")
    return kinds


def _as_number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _series(records: dict[int, dict], fields: tuple[str, ...]) -> Series:
    steps = sorted(records)
    columns = {name: [_as_number(records[s].get(name)) for s in steps] for name in ("tokens", *fields)}
    return Series(steps, columns)


def log_path(run_dir: str | Path) -> Path:
    """``RUN_DIR/log.jsonl``; a path to the log file itself is accepted too."""
    path = Path(run_dir)
    if path.is_file():
        return path
    if not path.exists():
        raise UserError(
            f"run directory {path} does not exist; pass a directory written by `gpt2repro train --out`"
        )
    log_file = path / LOG_NAME
    if not log_file.is_file():
        raise UserError(
            f"{log_file} not found: {path} is not a run directory of `gpt2repro train` "
            "(or the run has not logged its first step yet)"
        )
    return log_file


def _parse_line(line: str) -> tuple[object | None, bool]:
    """A log line's record, and whether a torn fragment was dropped from it.

    A process killed mid-write leaves a fragment without a newline; the resumed process then appends its
    first record to that same line. That record is recovered: it is the JSON object ending the line.
    """
    try:
        return json.loads(line), False
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(line) if ch == "{" and i > 0):
        try:
            record, end = decoder.raw_decode(line, start)
        except json.JSONDecodeError:
            continue
        if not line[end:].strip():
            return record, True
    return None, True


def read_log(run_dir: str | Path) -> tuple[dict[int, dict], dict[int, dict], int]:
    """Train and eval records keyed by step (last one wins), plus the number of unreadable lines skipped.

    A run that is still writing may leave a partial last line, and a run killed mid-write then resumed
    leaves a partial line in the middle: both are skipped with a warning rather than failing the plot.
    """
    path = log_path(run_dir)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise user_error_for(e, "read the log", path) from e
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    skipped = 0
    lines = text.split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record, torn = _parse_line(line)
        if torn:
            skipped += 1
            is_last = not any(rest.strip() for rest in lines[lineno:])
            if not is_last:
                log.warning("%s:%d: skipping a partial record (a run killed mid-write)", path, lineno)
        if record is None:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            log.warning("%s:%d: skipping a record without an integer 'step'", path, lineno)
            skipped += 1
            continue
        for kind in _record_kinds(record):
            if kind == "train":
                train[step] = record
            elif kind == "eval":
                evals[step] = record
    if not train and not evals:
        what = "is empty" if not text.strip() else "holds no train or eval record"
        raise UserError(
            f"{path} {what}: nothing to plot yet (the trainer writes a record every log interval; "
            "try again after its first step)"
        )
    return train, evals, skipped


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _mentions_fineweb_edu(text: str) -> bool:
    norm = _normalise(text)
    return "finewebedu" in norm or "edufineweb" in norm


def is_fineweb_edu_run(run_dir: Path, config: dict) -> bool:
    """True when the run trained on FineWeb-Edu: the data directory's manifest ``source`` says so.

    Falls back to a ``source`` entry of the config, then to the data directory's name (build-nanogpt's
    ``edu_fineweb10B``), when the manifest cannot be read (data moved or deleted since).
    """
    data = config.get("data")
    data_dir = None
    if isinstance(data, dict):
        for key in ("source", "data_source"):
            if isinstance(data.get(key), str):
                return _mentions_fineweb_edu(data[key])
        data = next((data[k] for k in ("dir", "path", "data_dir") if isinstance(data.get(k), str)), None)
    if isinstance(data, str):
        data_dir = Path(data)
        candidates = [data_dir] if data_dir.is_absolute() else [data_dir, run_dir / data_dir]
        for candidate in candidates:
            manifest = candidate / "manifest.json"
            try:
                source = json.loads(manifest.read_text()).get("source")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(source, str):
                return _mentions_fineweb_edu(source)
    for key in ("source", "data_source"):
        if isinstance(config.get(key), str):
            return _mentions_fineweb_edu(config[key])
    return data_dir is not None and _mentions_fineweb_edu(data_dir.name)


def load_run(run_dir: str | Path, name: str | None = None) -> RunLog:
    """Read a run directory's log (and config, for the data source) into plottable series."""
    path = log_path(run_dir)
    directory = path.parent
    train, evals, skipped = read_log(path)
    config: dict = {}
    config_file = directory / "config.json"
    if config_file.is_file():
        try:
            loaded = json.loads(config_file.read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError) as e:
            log.warning("%s is not readable JSON (%s); plotting without it", config_file, e)
    return RunLog(
        run_dir=directory,
        name=name or directory.resolve().name,
        train=_series(train, TRAIN_FIELDS),
        evals=_series(evals, EVAL_FIELDS),
        fineweb_edu=is_fineweb_edu_run(directory, config),
        skipped_lines=skipped,
    )


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, with its parent prepended where two names would collide."""
    resolved = [Path(d).resolve() for d in run_dirs]
    resolved = [p.parent if p.is_file() else p for p in resolved]
    names = [p.name for p in resolved]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in resolved]
