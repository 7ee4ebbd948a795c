"""``gpt2repro plot``: PNGs from a real (short) training run, log parsing per the run-directory contract."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pandas as pd
import pytest
from tiny_run import MAX_STEPS, make_tiny_run

from gpt2repro import cli
from gpt2repro.errors import UserError
from gpt2repro.plot import (
    GPT2_124M_FINEWEB_EDU_VAL_LOSS,
    GPT2_124M_HELLASWAG,
    GPT3_125M_HELLASWAG,
    auto_smoothing,
    ema,
    load_run,
    plot_runs,
    read_log,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Check the PNG signature and IHDR chunk; returns (width, height)."""
    data = path.read_bytes()
    assert len(data) > 1000, f"{path} is only {len(data)} bytes"
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def horizontal_lines(ax) -> set[float]:
    return {round(line.get_ydata()[0], 4) for line in ax.get_lines() if len(set(line.get_ydata())) == 1}


# ---------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("plot"))


def test_plot_cli_writes_png_of_real_run(run_dir, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert cli.main(["plot", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert png_size(out) == (1200, 1200)  # 12 x 12 inches at 100 dpi: three rows of panels


def test_plot_figure_panels_and_data_of_real_run(run_dir, tmp_path):
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train_loss" in r]
    assert len(steps) > len(set(steps)), "the resumed run logs the steps after its checkpoint twice"
    # readers keep the last record of each (step, kind)
    train = sorted({r["step"]: r for r in records if "train_loss" in r}.values(), key=lambda r: r["step"])
    evals = sorted({r["step"]: r for r in records if "val_loss" in r}.values(), key=lambda r: r["step"])
    assert [r["step"] for r in train] == list(range(1, MAX_STEPS + 1)) and len(evals) == 2

    out, fig = plot_runs([run_dir], tmp_path / "p.png")
    assert out.is_file()
    assert len(fig.axes) == 6  # loss/step, loss/tokens, lr, tokens/s, HellaSwag, memory
    by_title = {ax.get_title(): ax for ax in fig.axes}
    loss_ax = by_title["loss by optimizer step"]
    raw, smooth, val = loss_ax.get_lines()[:3]
    assert list(raw.get_xdata()) == [r["step"] for r in train]
    assert list(raw.get_ydata()) == pytest.approx([r["train_loss"] for r in train])
    assert smooth.get_ydata()[0] == pytest.approx(train[0]["train_loss"])  # EMA is bias-corrected
    assert list(val.get_ydata()) == pytest.approx([r["val_loss"] for r in evals])
    tokens_ax = by_title["loss by tokens seen"]
    assert list(tokens_ax.get_lines()[0].get_xdata()) == [r["tokens"] for r in train]
    lr_line = by_title["learning rate"].get_lines()[0]
    assert list(lr_line.get_ydata()) == pytest.approx([r["lr"] for r in train])
    throughput = by_title["throughput"].get_lines()[0]
    assert list(throughput.get_ydata()) == pytest.approx([r["tokens_per_s"] for r in train])
    hellaswag = by_title["HellaSwag acc_norm"]
    logged = [(r["step"], r["hellaswag_acc_norm"]) for r in evals if "hellaswag_acc_norm" in r]
    steps, accs = hellaswag.get_lines()[0].get_data()
    assert logged and list(zip(steps, accs, strict=True)) == logged
    assert {GPT2_124M_HELLASWAG, GPT3_125M_HELLASWAG} <= horizontal_lines(hellaswag)
    # the embedded corpus is not FineWeb-Edu: no GPT-2 FineWeb-Edu line
    assert GPT2_124M_FINEWEB_EDU_VAL_LOSS not in horizontal_lines(loss_ax)


def test_plot_overlays_runs_with_a_legend(run_dir, tmp_path):
    """Two runs overlaid, named by directory; the second one's log still being written (torn last line)."""
    other = tmp_path / "other-run"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("checkpoints"))
    records = (run_dir / "log.jsonl").read_text().splitlines()
    (other / "log.jsonl").write_text("\n".join(records[:4]) + "\n" + records[4][:20])
    out, fig = plot_runs([run_dir, other], tmp_path / "both.png", log_scale=True)
    png_size(out)
    assert len(fig.axes) == 6
    by_title = {ax.get_title(): ax for ax in fig.axes}
    loss_ax = by_title["loss by optimizer step"]
    labels = {t.get_text() for t in loss_ax.get_legend().get_texts()}
    assert {f"{run_dir.name} train (EMA)", f"{run_dir.name} val", "other-run train (EMA)"} <= labels
    assert loss_ax.get_yscale() == "log"
    lr_lines = by_title["learning rate"].get_lines()
    assert [line.get_label() for line in lr_lines] == [run_dir.name, "other-run"]
    assert len(lr_lines[1].get_xdata()) == sum("train_loss" in r for r in records[:4])
    assert lr_lines[0].get_color() != lr_lines[1].get_color()


def test_plot_marks_fineweb_edu_runs(run_dir, tmp_path):
    fineweb = tmp_path / "fineweb_data"
    fineweb.mkdir()
    (fineweb / "manifest.json").write_text(json.dumps({"source": "fineweb-edu", "shards": []}))
    run = tmp_path / "fw-run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((run / "config.json").read_text())
    config["data"] = str(fineweb)
    (run / "config.json").write_text(json.dumps(config))
    assert load_run(run).fineweb_edu and not load_run(run_dir).fineweb_edu
    _, fig = plot_runs([run], tmp_path / "fw.png")
    assert GPT2_124M_FINEWEB_EDU_VAL_LOSS in horizontal_lines(fig.axes[0])


# ---------------------------------------------------------------- logs being written, resumed, missing


def write_log(run: Path, lines: list[str]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "log.jsonl").write_text("\n".join(lines))


def train_record(step: int, loss: float) -> str:
    return json.dumps(
        dict(
            step=step,
            tokens=step * 512,
            elapsed=step * 0.1,
            train_loss=loss,
            lr=1e-3,
            grad_norm=1.0,
            dt=0.1,
            tokens_per_s=5120.0,
            mfu=0.01,
        )
    )


def test_log_still_being_written_skips_partial_last_line(tmp_path):
    write_log(tmp_path, [train_record(1, 9.0), train_record(2, 8.0), train_record(3, 7.0)[:25]])
    train, evals, skipped = read_log(tmp_path)
    assert sorted(train) == [1, 2] and not evals and skipped == 1


def test_resumed_log_keeps_last_record_per_step_and_kind(tmp_path):
    """Crash after step 3 (mid-write), resume from the step-2 checkpoint: steps 3-4 are logged again."""
    eval2 = json.dumps(dict(step=2, tokens=1024, elapsed=0.2, val_loss=8.5))
    eval2_again = json.dumps(dict(step=2, tokens=1024, elapsed=0.2, val_loss=8.4))
    lines = [
        train_record(1, 9.0),
        train_record(2, 8.0),
        eval2,
        train_record(3, 7.5),
        train_record(4, 7.4)[:30] + train_record(3, 7.0),  # resumed process appends after a torn line
        train_record(4, 6.0),
        eval2_again,
        train_record(5, 5.0),
    ]
    write_log(tmp_path, lines)
    run = load_run(tmp_path)
    assert run.skipped_lines == 1  # the torn step-4 fragment; the step-3 record after it is recovered
    assert run.train.get("train_loss") == ([1, 2, 3, 4, 5], [9.0, 8.0, 7.0, 6.0, 5.0])
    assert run.evals.get("val_loss") == ([2], [8.4])


def test_missing_or_empty_log_is_a_user_error(tmp_path, capsys):
    with pytest.raises(UserError, match="does not exist"):
        read_log(tmp_path / "nope")
    with pytest.raises(UserError, match="log.jsonl not found"):
        read_log(tmp_path)
    (tmp_path / "log.jsonl").write_text("")
    with pytest.raises(UserError, match="is empty"):
        read_log(tmp_path)
    (tmp_path / "log.jsonl").write_text('{"step": 1, "tok')
    with pytest.raises(UserError, match="no train or eval record"):
        read_log(tmp_path)
    assert cli.main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gpt2repro plot: error:" in err and "log.jsonl" in err


def test_ema_matches_pandas_adjusted_ewm():
    values = [10.0 - i * 0.5 + math.sin(i) for i in range(40)]
    expected = pd.Series(values).ewm(alpha=0.1, adjust=True).mean().tolist()
    assert ema(values, 0.9) == pytest.approx(expected, rel=1e-12)
    assert ema(values, 0.0) == values
    with pytest.raises(UserError):
        ema(values, 1.0)


def test_auto_smoothing_window_follows_log_length():
    assert auto_smoothing(6) == 0.0  # a handful of points: drawn as logged
    assert auto_smoothing(300) == pytest.approx(1 - 1 / 30)  # 30-point window
    assert auto_smoothing(19073) == pytest.approx(0.99)  # capped at 100 points
