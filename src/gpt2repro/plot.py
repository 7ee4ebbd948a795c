"""``gpt2repro plot``: loss, HellaSwag, learning-rate and throughput curves of one or more runs.

Reads ``RUN_DIR/log.jsonl`` as the trainer writes it (``run_log``: also a run still going, or resumed).
Figures are drawn on a bare ``matplotlib.figure.Figure`` rendered by Agg: no pyplot, no display, no global
backend change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from gpt2repro.errors import UserError
from gpt2repro.files import atomic_open, user_error_for
from gpt2repro.run_log import (  # noqa: F401 (the reading API stays importable from here)
    EVAL_FIELDS,
    LOG_NAME,
    MEMORY_LINES,
    TRAIN_FIELDS,
    RunLog,
    Series,
    is_fineweb_edu_run,
    load_run,
    log_path,
    read_log,
)
from gpt2repro.run_log import run_names as _run_names

DEFAULT_OUT_NAME = "plot.png"

# Reference lines (sources: docs/REPRODUCTION.md): the released GPT-2 124M checkpoint's loss on the
# FineWeb-Edu validation shard (llm.c / build-nanogpt), and HellaSwag acc_norm (10,042 val items).
GPT2_124M_FINEWEB_EDU_VAL_LOSS = 3.2924
GPT2_124M_HELLASWAG = 0.2955
GPT3_125M_HELLASWAG = 0.337
HELLASWAG_CHANCE = 0.25

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
        _draw_run(ax, run, color, smoothing)
    show_fineweb = any(r.fineweb_edu for r in runs) if fineweb_edu_baseline is None else fineweb_edu_baseline
    _finish_loss_panels(ax, show_fineweb, log_scale)
    _finish_step_panels(ax, runs, colors)
    fig.suptitle(title or ", ".join(r.name for r in runs))
    return fig


def _draw_run(ax: dict, run: RunLog, color: str, smoothing: float | None) -> None:
    """One run's curves: train loss (raw and EMA) and val loss by step and by tokens, LR, tokens/s and
    HellaSwag acc_norm."""
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


def _finish_loss_panels(ax: dict, show_fineweb: bool, log_scale: bool) -> None:
    """The two loss panels' FineWeb-Edu reference line, axes, titles, legends and grids."""
    for name in ("loss_step", "loss_tokens"):
        if show_fineweb:
            ax[name].axhline(
                GPT2_124M_FINEWEB_EDU_VAL_LOSS,
                color="red",
                linestyle=":",
                label=f"GPT-2 124M FineWeb-Edu val ({GPT2_124M_FINEWEB_EDU_VAL_LOSS})",
            )
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


def _finish_step_panels(ax: dict, runs: list[RunLog], colors: list[str]) -> None:
    """The LR, throughput, HellaSwag (with its reference lines) and memory panels' axes and legends."""
    ax["lr"].set_title("learning rate")
    ax["lr"].set_xlabel("step")
    ax["throughput"].set_title("throughput")
    ax["throughput"].set_xlabel("step")
    ax["throughput"].set_ylabel("tokens/s")
    ax["throughput"].yaxis.set_major_formatter(EngFormatter())
    if "hellaswag" in ax:
        hs = ax["hellaswag"]
        for value, color, who in (
            (GPT2_124M_HELLASWAG, "red", "GPT-2 124M"),
            (GPT3_125M_HELLASWAG, "green", "GPT-3 125M"),
        ):
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
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run directories of `gpt2repro train` (or their log.jsonl files); several are overlaid",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="PNG to write (default: RUN_DIR/plot.png for one run, ./plot.png for several)",
    )
    parser.add_argument("--log-scale", action="store_true", help="logarithmic y axis for the loss panels")
    parser.add_argument(
        "--smoothing",
        type=float,
        default=None,
        help="EMA coefficient for the smoothed train loss, in [0, 1) (default: a window of "
        "~1/10 of the logged points, at most 100)",
    )
    parser.add_argument(
        "--fineweb-edu-baseline",
        choices=("auto", "show", "hide"),
        default="auto",
        help="the GPT-2 124M FineWeb-Edu val loss line: auto = only for FineWeb-Edu runs",
    )
    parser.add_argument("--title", default=None, help="figure title (default: the run names)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default 100)")


def run(args: argparse.Namespace) -> int:
    baseline = {"auto": None, "show": True, "hide": False}[args.fineweb_edu_baseline]
    if args.dpi <= 0:
        raise UserError(f"--dpi must be positive, got {args.dpi}")
    out, _ = plot_runs(
        args.run_dirs,
        args.out,
        dpi=args.dpi,
        log_scale=args.log_scale,
        smoothing=args.smoothing,
        fineweb_edu_baseline=baseline,
        title=args.title,
    )
    print(out)
    return 0
