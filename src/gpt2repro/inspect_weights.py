"""``gpt2repro inspect``: pictures and summary statistics of a model's weights.

What training put into the weights is visible: trained position embeddings are smooth waves over
positions 0…block_size-1 (fresh ones are noise), token embedding norms separate frequent from rare
tokens, and projection matrices grow structure. The same pictures of a fresh model (``--model-preset``)
are the baseline. Figures are bare ``matplotlib.figure.Figure`` objects rendered by Agg (no pyplot).
"""

from __future__ import annotations

import argparse
import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from gpt2repro.checkpoint import is_run_dir, latest_checkpoint
from gpt2repro.config import EOT_TOKEN_ID, PRESETS
from gpt2repro.errors import UserError
from gpt2repro.files import atomic_open, atomic_write, user_error_for
from gpt2repro.model import GPT
from gpt2repro.weights import CONV1D_WEIGHTS, load_or_init

DEFAULT_MATRIX = "h.0.attn.c_attn.weight"
DEFAULT_MATRIX_SIZE = 300
CLASSIC_WPE_COLUMNS = (150, 200, 250)  # the columns usually shown for GPT-2 124M's position embedding
_LAYER_INDEX = re.compile(r"(^|\.)h\.\d+\.")


# ---------------------------------------------------------------- statistics


@dataclass
class GroupStats:
    """Statistics of all weights of one parameter group (the same tensor across layers is one group)."""

    group: str
    tensors: int
    numel: int
    mean: float
    std: float
    max_abs: float


def short_name(name: str) -> str:
    return name.removeprefix("transformer.")


def group_name(name: str) -> str:
    """``transformer.h.3.attn.c_attn.weight`` -> ``h.*.attn.c_attn.weight``."""
    return _LAYER_INDEX.sub(r"\1h.*.", short_name(name))


def _real_rows(model: GPT, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Drop padded vocabulary rows: they are never used, so they would only blur the picture."""
    if short_name(name) == "wte.weight":
        return tensor[: model.config.vocab_size]
    return tensor


def weight_stats(model: GPT, per_layer: bool = False) -> list[GroupStats]:
    """Mean, standard deviation (n-1) and max |w| per parameter group, accumulated in float64.

    The tied LM head is the token embedding and is listed once (as ``wte.weight``).
    """
    acc: dict[str, list[float]] = {}  # group -> [tensors, n, sum, sum of squares, max |w|]
    for name, param in model.named_parameters():
        w = _real_rows(model, name, param.detach()).double()
        key = short_name(name) if per_layer else group_name(name)
        a = acc.setdefault(key, [0, 0, 0.0, 0.0, 0.0])
        a[0] += 1
        a[1] += w.numel()
        a[2] += w.sum().item()
        a[3] += (w * w).sum().item()
        a[4] = max(a[4], w.abs().max().item())
    rows = []
    for key, (count, n, total, squares, max_abs) in acc.items():
        mean = total / n
        var = max(squares - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
        rows.append(GroupStats(key, int(count), int(n), mean, var**0.5, max_abs))
    return rows


STATS_COLUMNS = ("group", "tensors", "numel", "mean", "std", "max_abs")


def stats_markdown(rows: list[GroupStats]) -> str:
    lines = ["| " + " | ".join(STATS_COLUMNS) + " |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| `{r.group}` | {r.tensors} | {r.numel:,} | {r.mean:+.3e} | {r.std:.3e} | {r.max_abs:.3e} |"
        )
    return "\n".join(lines) + "\n"


def write_stats(rows: list[GroupStats], out_dir: Path) -> tuple[Path, Path]:
    csv_path, md_path = out_dir / "weight_stats.csv", out_dir / "weight_stats.md"
    with atomic_open(csv_path, "w", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(STATS_COLUMNS)
        for r in rows:
            writer.writerow([r.group, r.tensors, r.numel, repr(r.mean), repr(r.std), repr(r.max_abs)])
    atomic_write(md_path, stats_markdown(rows))
    return csv_path, md_path


# ---------------------------------------------------------------- pictures


def default_wpe_columns(n_embd: int) -> list[int]:
    """The classic columns where the model is that wide, else three spread over its width."""
    if n_embd > max(CLASSIC_WPE_COLUMNS):
        return list(CLASSIC_WPE_COLUMNS)
    return sorted({n_embd // 4, n_embd // 2, (3 * n_embd) // 4})


def position_embedding_figure(model: GPT, columns: list[int] | None = None, label: str = "") -> Figure:
    """A few columns of ``wpe`` against position: waves when trained, noise when fresh. One axes."""
    wpe = model.transformer.wpe.weight.detach().float().cpu().numpy()
    n_pos, n_embd = wpe.shape
    columns = default_wpe_columns(n_embd) if columns is None else columns
    bad = [c for c in columns if not 0 <= c < n_embd]
    if bad or not columns:
        raise UserError(f"--wpe-columns {bad or columns}: give column indices between 0 and {n_embd - 1}")
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.add_subplot()
    for c in columns:
        ax.plot(np.arange(n_pos), wpe[:, c], linewidth=1, label=f"column {c}")
    ax.set_xlabel(f"position (0…{n_pos - 1})")
    ax.set_ylabel("wpe value")
    ax.set_title(f"position embedding columns {label}".strip())
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return fig


def token_embedding_norm_figure(model: GPT, label: str = "") -> Figure:
    """L2 norm of every real token's ``wte`` row against its id (the EOT token marked). One axes."""
    wte = _real_rows(model, "wte.weight", model.transformer.wte.weight.detach()).float().cpu()
    norms = wte.norm(dim=1).numpy()
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(np.arange(len(norms)), norms, s=0.5, alpha=0.4, linewidths=0, rasterized=True)
    if EOT_TOKEN_ID < len(norms):
        ax.scatter([EOT_TOKEN_ID], [norms[EOT_TOKEN_ID]], color="red", s=20, label="<|endoftext|>")
        ax.legend(fontsize="small")
    ax.set_xlabel("token id")
    ax.set_ylabel("‖wte row‖₂")
    ax.set_title(f"token embedding norm by token id {label}".strip())
    ax.grid(True, alpha=0.3)
    return fig


def find_matrix(model: GPT, name: str) -> tuple[str, torch.Tensor]:
    """A 2-D parameter by name, with or without the ``transformer.`` prefix, in OpenAI/HF layout.

    The four projections are ``nn.Linear`` (out, in) here but (in, out) in OpenAI's and HF's files; they
    are shown transposed so the picture is the one people know from the released checkpoint.
    """
    params = {short_name(n): p for n, p in model.named_parameters()}
    key = short_name(name)
    if key not in params:
        matrices = [n for n, p in params.items() if p.dim() == 2]
        raise UserError(
            f"--matrix {name!r}: no such parameter; 2-D ones include {', '.join(matrices[:8])}, …"
        )
    w = _real_rows(model, key, params[key].detach())
    if w.dim() != 2:
        raise UserError(
            f"--matrix {name!r} has shape {tuple(w.shape)}; pick a 2-D weight such as {DEFAULT_MATRIX}"
        )
    if key.endswith(CONV1D_WEIGHTS):
        w = w.t()
    return key, w


def weight_heatmap_figure(
    model: GPT, name: str = DEFAULT_MATRIX, size: int = DEFAULT_MATRIX_SIZE, label: str = ""
) -> Figure:
    """The top-left ``size``×``size`` block of a weight matrix as an image (two axes: image, colorbar)."""
    if size <= 0:
        raise UserError(f"--matrix-size must be positive, got {size}")
    key, w = find_matrix(model, name)
    block = w[:size, :size].float().cpu().numpy()
    limit = float(np.percentile(np.abs(block), 99.5)) or 1e-12  # a few outliers must not wash it out
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot()
    # aspect="auto": a non-square block (a narrow model's 128 rows) still fills the panel beside its colorbar
    image = ax.imshow(block, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest", aspect="auto")
    fig.colorbar(image, ax=ax)
    rows, cols = block.shape
    ax.set_title(f"{key}[:{rows}, :{cols}] {label}".strip(), fontsize="medium")
    ax.set_xlabel("output feature" if key.endswith(CONV1D_WEIGHTS) else "column")
    ax.set_ylabel("input feature" if key.endswith(CONV1D_WEIGHTS) else "row")
    return fig


# ---------------------------------------------------------------- everything at once


@dataclass
class InspectResult:
    images: dict[str, Path]
    figures: dict[str, Figure]
    stats: list[GroupStats]
    tables: tuple[Path, Path]


def inspect_model(
    model: GPT,
    out_dir: str | Path,
    *,
    label: str = "",
    matrix: str = DEFAULT_MATRIX,
    matrix_size: int = DEFAULT_MATRIX_SIZE,
    wpe_columns: list[int] | None = None,
    per_layer: bool = False,
    dpi: int = 100,
) -> InspectResult:
    """Write the three pictures and the statistics table of ``model`` into ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a directory to write the pictures into")
    figures = {
        "position_embedding": position_embedding_figure(model, wpe_columns, label),
        "token_embedding_norms": token_embedding_norm_figure(model, label),
        "weight_heatmap": weight_heatmap_figure(model, matrix, matrix_size, label),
    }
    stats = weight_stats(model, per_layer=per_layer)
    images = {name: out_dir / f"{name}.png" for name in figures}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, fig in figures.items():
            with atomic_open(images[name], "wb") as f:
                fig.savefig(f, dpi=dpi, format="png")
        tables = write_stats(stats, out_dir)
    except OSError as e:
        raise user_error_for(e, "write the pictures into", out_dir) from e
    return InspectResult(images, figures, stats, tables)


def load_model(model: str | None, preset: str | None, seed: int = 1337) -> tuple[GPT, str]:
    """The model to inspect and a short label: saved weights, or a fresh (seeded) init of a preset."""
    net = load_or_init(model, preset, seed).eval()
    if preset is not None:
        return net, f"({preset}, fresh init)"
    label = Path(str(model)).name or str(model)
    checkpoint = latest_checkpoint(model) if is_run_dir(model) else None
    if checkpoint is not None:  # step_00000300.pt -> "step 300"
        label += f", step {int(checkpoint.stem.removeprefix('step_'))}"
    return net, f"({label})"


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        metavar="DIR_OR_NAME",
        help="run directory, checkpoint file, Hugging Face GPT-2 directory or hub name",
    )
    source.add_argument(
        "--model-preset",
        choices=list(PRESETS),
        metavar="NAME",
        help=f"a freshly initialised model of this shape: {', '.join(PRESETS)}",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory for the PNGs and weight_stats.csv/.md",
    )
    parser.add_argument("--seed", type=int, default=1337, help="init seed for --model-preset (default 1337)")
    parser.add_argument(
        "--matrix",
        default=DEFAULT_MATRIX,
        help=f"2-D parameter shown as a heatmap (default {DEFAULT_MATRIX})",
    )
    parser.add_argument(
        "--matrix-size",
        type=int,
        default=DEFAULT_MATRIX_SIZE,
        help=f"show its top-left N×N block (default {DEFAULT_MATRIX_SIZE})",
    )
    parser.add_argument(
        "--wpe-columns",
        default=None,
        help="comma-separated position-embedding columns to draw (default 150,200,250 "
        "or three spread over a narrower model)",
    )
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="statistics per tensor instead of per group of same-named tensors across layers",
    )
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNGs (default 100)")


def _parse_columns(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError as e:
        raise UserError(f"--wpe-columns {text!r}: give comma-separated integers such as 150,200,250") from e


def run(args: argparse.Namespace) -> int:
    if args.dpi <= 0:
        raise UserError(f"--dpi must be positive, got {args.dpi}")
    model, label = load_model(args.model, args.model_preset, args.seed)
    result = inspect_model(
        model,
        args.out,
        label=label,
        matrix=args.matrix,
        matrix_size=args.matrix_size,
        wpe_columns=_parse_columns(args.wpe_columns),
        per_layer=args.per_layer,
        dpi=args.dpi,
    )
    print(stats_markdown(result.stats), end="")
    for path in (*result.images.values(), *result.tables):
        print(path)
    return 0
