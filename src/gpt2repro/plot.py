"""``gpt2repro plot``: loss, HellaSwag, learning-rate and throughput curves of one or more runs.

Reads ``RUN_DIR/log.jsonl`` as the trainer writes it, so it works on a run that is still going (a half
written last line is skipped) and on resumed runs (the log is appended to; the last record of each
(step, kind) wins, as after a resume the steps since the checkpoint are logged again). Figures are drawn
on a bare ``matplotlib.figure.Figure`` rendered by Agg: no pyplot, no display, no global backend change.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from gpt2repro.errors import UserError
from gpt2repro.files import atomic_open, user_error_for

log = logging.getLogger("gpt2repro")

LOG_NAME = "log.jsonl"
DEFAULT_OUT_NAME = "plot.png"

# Reference lines (sources: docs/REPRODUCTION.md): the released GPT-2 124M checkpoint's loss on the
# FineWeb-Edu validation shard (llm.c / build-nanogpt), and HellaSwag acc_norm (10,042 val items).
GPT2_124M_FINEWEB_EDU_VAL_LOSS = 3.2924
GPT2_124M_HELLASWAG = 0.2955
GPT3_125M_HELLASWAG = 0.337
HELLASWAG_CHANCE = 0.25

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



# ---------------------------------------------------------------- reading a run


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


def _run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, with its parent prepended where two names would collide."""
    resolved = [Path(d).resolve() for d in run_dirs]
    resolved = [p.parent if p.is_file() else p for p in resolved]
    names = [p.name for p in resolved]
    return [
        f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name
        for p in resolved
    ]


# ---------------------------------------------------------------- drawing


def auto_smoothing(num_points: int) -> float:
    """An EMA coefficient whose window is ~1/10 of the logged points, between 1 (none) and 100 points.

    A fixed coefficient lags badly on short or sparsely logged runs (0.9 over 20 points trails the loss by
    half the run) and barely smooths a 19k-step log; this keeps the curve's shape at every length.
    """
    window = min(max(num_points / 10.0, 1.0), 100.0)
    return 1.0 - 1.0 / window


def ema(values: list[float], smoothing: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing): early points not pulled to 0."""
    if not 0.0 <= smoothing < 1.0:
        raise UserError(f"--smoothing must be in [0, 1), got {smoothing}")
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = smoothing * avg + (1.0 - smoothing) * v
        out.append(avg / (1.0 - smoothing**i))
    return out


def _panel_names(runs: list[RunLog]) -> list[list[str]]:
    """Two rows of two panels, then HellaSwag and memory (side by side, or one alone across the row)."""
    layout = [["loss_step", "loss_tokens"], ["lr", "throughput"]]
    extra = []
    if any(run.evals.has("hellaswag_acc_norm") for run in runs):
        extra.append("hellaswag")
    if any(run.train.has(name) for run in runs for name in MEMORY_LINES):
        extra.append("memory")
    if extra:
        layout.append(extra if len(extra) == 2 else extra * 2)
    return layout


def _draw_memory(ax, runs: list[RunLog], colors: list[str]) -> None:
    """Each memory column of each run in GiB: one color per run, one line style per kind of memory."""
    for run, color in zip(runs, colors, strict=True):
        for name, (label, style) in MEMORY_LINES.items():
            steps, mib = run.train.get(name)
            gib = [v / 1024 for v in mib]
            if steps:
                ax.plot(steps, gib, color=color, linestyle=style, label=f"{run.name} {label}")
    ax.set(title="memory (peak of each log interval)", xlabel="step", ylabel="GiB")


def draw_runs(
    runs: list[RunLog],
    *,
    log_scale: bool = False,
    smoothing: float | None = None,
    fineweb_edu_baseline: bool | None = None,
    title: str | None = None,
) -> Figure:
    """The figure: loss vs step and vs tokens, LR, tokens/s, and HellaSwag acc_norm and memory when any run
    logged them.

    ``smoothing=None`` picks the EMA coefficient per run (``auto_smoothing``); ``fineweb_edu_baseline=None``
    draws the GPT-2 124M FineWeb-Edu line only if a run trained on FineWeb-Edu.
    Returns the (unsaved) Figure: 4 panels, 5 with HellaSwag or memory, 6 with both.
    """
    layout = _panel_names(runs)
    fig = Figure(figsize=(12, 4 * len(layout)), layout="constrained")
    ax = fig.subplot_mosaic(layout)
    for name in ("lr", "throughput", "hellaswag", "memory"):  # every panel by step spans the same steps
        if name in ax:
            ax[name].sharex(ax["loss_step"])
    colors = [f"C{i % 10}" for i in range(len(runs))]

    for run, color in zip(runs, colors, strict=True):
        steps, losses = run.train.get("train_loss")
        tok_x, tok_losses = run.train.by_tokens("train_loss")
        beta = auto_smoothing(len(losses)) if smoothing is None else smoothing
        if steps:
            ax["loss_step"].plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
            ax["loss_step"].plot(steps, ema(losses, beta), color=color, label=f"{run.name} train (EMA)")
        if tok_x:
            ax["loss_tokens"].plot(tok_x, tok_losses, color=color, alpha=0.25, linewidth=0.8)
            ax["loss_tokens"].plot(tok_x, ema(tok_losses, beta), color=color, label=f"{run.name} train (EMA)")
        val_steps, val_losses = run.evals.get("val_loss")
        val_tok, val_tok_losses = run.evals.by_tokens("val_loss")
        val_style = dict(color=color, linestyle="--", marker="o", markersize=3)
        if val_steps:
            ax["loss_step"].plot(val_steps, val_losses, label=f"{run.name} val", **val_style)
        if val_tok:
            ax["loss_tokens"].plot(val_tok, val_tok_losses, label=f"{run.name} val", **val_style)
        ax["lr"].plot(*run.train.get("lr"), color=color, label=run.name)
        ax["throughput"].plot(*run.train.get("tokens_per_s"), color=color, label=run.name)
        if "hellaswag" in ax:
            hs_steps, hs_acc = run.evals.get("hellaswag_acc_norm")
            if hs_steps:
                ax["hellaswag"].plot(hs_steps, hs_acc, color=color, marker="o", markersize=3, label=run.name)

    show_fineweb = any(r.fineweb_edu for r in runs) if fineweb_edu_baseline is None else fineweb_edu_baseline
    for name in ("loss_step", "loss_tokens"):
        if show_fineweb:
            ax[name].axhline(GPT2_124M_FINEWEB_EDU_VAL_LOSS, color="red", linestyle=":",
                             label=f"GPT-2 124M FineWeb-Edu val ({GPT2_124M_FINEWEB_EDU_VAL_LOSS})")
        ax[name].set_ylabel("loss (nats/token)")
        if log_scale:
            ax[name].set_yscale("log")
        ax[name].legend(fontsize="small")
        ax[name].grid(True, alpha=0.3)
    ax["loss_step"].set_xlabel("step")
    ax["loss_step"].set_title("loss by optimizer step")
    ax["loss_tokens"].set_xlabel("tokens")
    ax["loss_tokens"].set_title("loss by tokens seen")
    ax["loss_tokens"].xaxis.set_major_formatter(EngFormatter())

    ax["lr"].set_title("learning rate")
    ax["lr"].set_xlabel("step")
    ax["throughput"].set_title("throughput")
    ax["throughput"].set_xlabel("step")
    ax["throughput"].set_ylabel("tokens/s")
    ax["throughput"].yaxis.set_major_formatter(EngFormatter())
    if "hellaswag" in ax:
        hs = ax["hellaswag"]
        for value, color, who in ((GPT2_124M_HELLASWAG, "red", "GPT-2 124M"),
                                  (GPT3_125M_HELLASWAG, "green", "GPT-3 125M")):
            hs.axhline(value, color=color, linestyle=":", label=f"{who} ({value})")
        hs.axhline(HELLASWAG_CHANCE, color="gray", linestyle=":", label="chance (0.25)")
        hs.set_title("HellaSwag acc_norm")
        hs.set_xlabel("step")
        hs.set_ylabel("accuracy")
    if "memory" in ax:
        _draw_memory(ax["memory"], runs, colors)
    for name in ("lr", "throughput", "hellaswag", "memory"):
        if name in ax:
            ax[name].grid(True, alpha=0.3)
            if len(runs) > 1 or name in ("hellaswag", "memory"):
                ax[name].legend(fontsize="small")
    fig.suptitle(title or ", ".join(r.name for r in runs))
    return fig


def default_out(run_dirs: list[Path]) -> Path:
    """One run: ``RUN_DIR/plot.png``; several: ``plot.png`` in the current directory."""
    if len(run_dirs) == 1:
        return log_path(run_dirs[0]).parent / DEFAULT_OUT_NAME
    return Path(DEFAULT_OUT_NAME)


def plot_runs(
    run_dirs: list[str | Path],
    out: str | Path | None = None,
    *,
    dpi: int = 100,
    **draw_options,
) -> tuple[Path, Figure]:
    """Read the runs, draw them overlaid and save a PNG; returns its path and the Figure."""
    if not run_dirs:
        raise UserError("give at least one run directory")
    run_dirs = [Path(d) for d in run_dirs]
    runs = [load_run(d, name) for d, name in zip(run_dirs, _run_names(run_dirs), strict=True)]
    out = Path(out) if out is not None else default_out(run_dirs)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: only PNG output is supported; give a file name ending in .png")
    fig = draw_runs(runs, **draw_options)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out, "wb") as f:
            fig.savefig(f, dpi=dpi, format="png")
    except OSError as e:
        raise user_error_for(e, "write the plot", out) from e
    return out, fig


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories of `gpt2repro train` (or their log.jsonl files); "
                        "several are overlaid")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.png",
                        help="PNG to write (default: RUN_DIR/plot.png for one run, ./plot.png for several)")
    parser.add_argument("--log-scale", action="store_true", help="logarithmic y axis for the loss panels")
    parser.add_argument("--smoothing", type=float, default=None,
                        help="EMA coefficient for the smoothed train loss, in [0, 1) (default: a window of "
                        "~1/10 of the logged points, at most 100)")
    parser.add_argument("--fineweb-edu-baseline", choices=("auto", "show", "hide"), default="auto",
                        help="the GPT-2 124M FineWeb-Edu val loss line: auto = only for FineWeb-Edu runs")
    parser.add_argument("--title", default=None, help="figure title (default: the run names)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default 100)")


def run(args: argparse.Namespace) -> int:
    baseline = {"auto": None, "show": True, "hide": False}[args.fineweb_edu_baseline]
    if args.dpi <= 0:
        raise UserError(f"--dpi must be positive, got {args.dpi}")
    out, _ = plot_runs(
        args.run_dirs, args.out, dpi=args.dpi, log_scale=args.log_scale, smoothing=args.smoothing,
        fineweb_edu_baseline=baseline, title=args.title,
    )
    print(out)
    return 0
