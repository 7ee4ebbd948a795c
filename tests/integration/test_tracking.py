"""``--log-to tensorboard,wandb`` on a real (tiny) run that is killed and resumed: the event files and the
offline W&B run, read back with TensorBoard's own reader and W&B's documented file format, hold exactly
what log.jsonl holds, with no step twice; memory columns in the log, the console and ``plot``."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tiny_run import HELLASWAG
from training_helpers import T, as_flags, run_overrides, tiny_corpus
from wandb.proto import wandb_internal_pb2

from gpt2repro import plot, runtime
from gpt2repro.checkpoint import checkpoint_path
from gpt2repro.errors import UserError
from gpt2repro.prepare import prepare_corpus
from gpt2repro.sources import embedded_documents
from gpt2repro.train_config import resolve

MAX_STEPS = 6
# log.jsonl key -> the tag both trackers must show it under (the contract users build dashboards on)
EXPECTED_TAGS = {
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
    "cpu_rss_mib": "memory/cpu_rss_mib",
    "cpu_peak_rss_mib": "memory/cpu_peak_rss_mib",
    "cuda_max_allocated_mib": "memory/cuda_max_allocated_mib",
    "cuda_max_reserved_mib": "memory/cuda_max_reserved_mib",
}


def train_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "gpt2repro", "train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """6 steps with both trackers, a "crash" after step 6 (its checkpoint removed), then ``--resume``."""
    root = tmp_path_factory.mktemp("tracked")
    data, run, wandb_dir = root / "data", root / "run", root / "wandb-dir"
    tiny_corpus(data)
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    fields = run_overrides(
        data,
        run,
        total_batch=4 * T,
        max_steps=MAX_STEPS,
        eval_every=3,
        eval_tokens=256,
        checkpoint_every=3,
        sample_every=3,
        num_samples=2,
        sample_tokens=8,
        hellaswag=HELLASWAG,
        hellaswag_every=MAX_STEPS,
        hellaswag_limit=8,
        log_to="tensorboard,wandb",
        wandb_project="gpt2repro-tests",
        wandb_run_name="tiny-tracked",
    )
    first = train_cli(as_flags(fields), env)
    first_log = (run / "log.jsonl").read_text()
    checkpoint_path(run, MAX_STEPS).unlink()
    resumed = train_cli(["--out", str(run), "--resume"], env)
    return {
        "run": run,
        "wandb_dir": wandb_dir,
        "first_log": first_log,
        "console": first.stderr + resumed.stderr,
    }


def last_records(run: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """The last train and eval record of each step (what a resumed run's log means; plot reads it so)."""
    train, evals, skipped = plot.read_log(run)
    assert skipped == 0
    return train, evals


def expected_points(run: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} that log.jsonl says the trackers must show (tokens/elapsed: train records)."""
    train, evals = last_records(run)
    points: dict[str, dict[int, float]] = {}
    for records, kind in ((train, "train"), (evals, "eval")):
        for step, record in records.items():
            for key, value in record.items():
                if key == "step" or value is None or (kind == "eval" and key in ("tokens", "elapsed")):
                    continue
                assert key in EXPECTED_TAGS, f"log.jsonl key {key!r} has no tracker tag in this test"
                points.setdefault(EXPECTED_TAGS[key], {})[step] = value
    return points


def test_the_run_logged_what_the_trackers_are_checked_against(tracked):
    points = expected_points(tracked["run"])
    assert sorted(points["loss/train"]) == list(range(1, MAX_STEPS + 1))
    assert sorted(points["loss/val"]) == [3, 6] and sorted(points["hellaswag/acc_norm"]) == [6]
    assert sorted(points["memory/cpu_rss_mib"]) == list(range(1, MAX_STEPS + 1))
    first = [json.loads(line) for line in tracked["first_log"].splitlines()]
    old_dt = {r["step"]: r["dt"] for r in first if "train_loss" in r}
    assert all(points["perf/step_time_s"][s] != old_dt[s] for s in (4, 5, 6)), "steps 4-6 were logged anew"


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_equal_log_jsonl_with_no_step_twice(tracked):
    acc = event_accumulator.EventAccumulator(
        str(tracked["run"] / "tensorboard"), size_guidance={"scalars": 0}
    )
    acc.Reload()
    points = expected_points(tracked["run"])
    assert set(acc.Tags()["scalars"]) == set(points)
    for tag, by_step in points.items():
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        assert steps == sorted(by_step), tag
        got = {e.step: e.value for e in events}
        for step, value in by_step.items():  # event files hold float32
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-9), (tag, step)


def test_tensorboard_holds_the_samples_and_the_config(tracked):
    run = tracked["run"]
    # the accumulator of TensorBoard's own server (the legacy one above never purges text)
    acc = plugin_event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    samples = acc.Tensors("samples/text_summary")
    assert [e.step for e in samples] == [3, 6]
    blocks = (run / "samples.txt").read_text().split("=== step ")[-1].split("\n--- ")[1:]
    assert len(blocks) == 2
    text = samples[-1].tensor_proto.string_val[0].decode()
    assert all(block.rstrip("\n") in text for block in blocks)
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    config = json.loads((run / "config.json").read_text())
    assert hparams["lr"].number_value == config["lr"] and hparams["model"].string_value == "gpt2-micro"
    assert [e.step for e in acc.Tensors("config/text_summary")] == [0, 4]  # fresh start, resumed at step 4


# ---------------------------------------------------------------- W&B (offline)

_WANDB_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)  # magic, version 0
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file: W&B's transaction log uses LevelDB's log format (32 KiB
    blocks of chunks, each with a crc32c, a 2-byte length and a type), after a 7-byte header."""
    data = path.read_bytes()
    assert data[:7] == _WANDB_HEADER, f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a chunk header is zero padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (_FULL, _FIRST):
            pending = b""
        pending += chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(path: Path) -> tuple[dict[int, dict], list]:
    """step -> {key: value} of the history rows, and the run records, of one offline run."""
    rows, runs = {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            rows[row["_step"]] = row
        elif kind == "run":
            runs.append(record.run)
    return rows, runs


def test_wandb_offline_history_equals_log_jsonl_and_resume_keeps_the_run_id(tracked):
    run_id = (tracked["run"] / "wandb_id").read_text().strip()
    offline = sorted((tracked["wandb_dir"] / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(f"-{run_id}") for d in offline), offline
    (first_rows, first_runs), (resumed_rows, resumed_runs) = (
        wandb_history(d / f"run-{run_id}.wandb") for d in offline
    )
    assert sorted(first_rows) == list(range(1, MAX_STEPS + 1)) and sorted(resumed_rows) == [4, 5, 6]
    for record in first_runs + resumed_runs:
        assert (record.run_id, record.project, record.display_name) == (
            run_id,
            "gpt2repro-tests",
            "tiny-tracked",
        )
    config = {item.key: json.loads(item.value_json) for item in first_runs[0].config.update}
    assert config["lr"] == 3e-3 and config["log_to"] == "tensorboard,wandb"
    rows = first_rows | resumed_rows  # the resumed run's rows replace the first one's from step 4
    for tag, by_step in expected_points(tracked["run"]).items():
        for step, value in by_step.items():
            assert rows[step][tag] == pytest.approx(value, rel=1e-12), (tag, step)
    assert {s for s, row in rows.items() if "samples/_type" in row} == {3, 6}
    # the last samples, as W&B's table file (written beside the resumed run's history)
    assert rows[6]["samples/_type"] == "table-file"
    table = json.loads((offline[1] / "files" / rows[6]["samples/path"]).read_text())
    texts = (tracked["run"] / "samples.txt").read_text().split("=== step 6\n")[-1].split("--- ")[1:]
    assert table["columns"] == ["step", "sample"]
    assert table["data"] == [[6, t.removesuffix("\n")] for t in texts]


# ---------------------------------------------------------------- memory


def test_memory_in_the_console_and_the_plot(tracked, tmp_path):
    train, _ = last_records(tracked["run"])
    for record in train.values():
        assert 0 < record["cpu_rss_mib"] <= record["cpu_peak_rss_mib"]
    assert all(f"| rss {round(r['cpu_rss_mib'])} MiB |" in tracked["console"] for r in train.values())
    _, fig = plot.plot_runs([tracked["run"]], tmp_path / "p.png")
    memory = {ax.get_title(): ax for ax in fig.axes}["memory (peak of each log interval)"]
    lines = {line.get_label(): line for line in memory.get_lines()}
    rss = lines[f"{tracked['run'].name} CPU RSS"]
    assert list(rss.get_xdata()) == sorted(train)
    assert list(rss.get_ydata()) == pytest.approx([train[s]["cpu_rss_mib"] / 1024 for s in sorted(train)])


def test_memory_stats_names_are_the_ones_plot_and_trackers_read():
    assert set(runtime.MEMORY_FIELDS) == set(plot.MEMORY_LINES) <= set(EXPECTED_TAGS)
    stats = runtime.memory_stats(torch.device("cpu"))
    assert set(stats) == {"cpu_rss_mib", "cpu_peak_rss_mib"} and stats["cpu_rss_mib"] > 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_stats_are_the_peak_of_each_interval():
    device = torch.device("cuda")
    runtime.memory_stats(device, reset_peak=True)
    x = torch.empty(256 << 20, dtype=torch.uint8, device=device)  # 256 MiB
    del x
    first = runtime.memory_stats(device, reset_peak=True)
    assert first["cuda_max_allocated_mib"] >= 256 and first["cuda_max_reserved_mib"] >= 256
    second = runtime.memory_stats(device, reset_peak=True)
    assert second["cuda_max_allocated_mib"] < first["cuda_max_allocated_mib"] - 200  # a new interval
    assert runtime.format_memory(first).startswith("mem 0.2")


# ---------------------------------------------------------------- choosing trackers


def test_log_to_choices():
    base = {"data": "d", "out": "o"}
    assert resolve(None, base).log_targets == ()
    assert resolve(None, base | {"log_to": "wandb, tensorboard"}).log_targets == ("wandb", "tensorboard")
    with pytest.raises(UserError, match=r"unknown tracker 'mlflow'; choose tensorboard, wandb"):
        resolve(None, base | {"log_to": "tensorboard,mlflow"})


@pytest.mark.slow
@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_one_line(package, tmp_path):
    """The package made unimportable in a fresh process (``sys.modules[name] = None``): as if not there."""
    data = tmp_path / "data"
    prepare_corpus(
        embedded_documents(), data, source_name="embedded", max_tokens=8_000, val_tokens=1_024, workers=1
    )
    argv = [
        "train",
        "--model",
        "gpt2-micro",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--seq-len",
        "16",
        "--micro-batch",
        "2",
        "--total-batch",
        "32",
        "--max-steps",
        "1",
        "--log-to",
        package,
    ]
    code = (
        f"import sys; sys.modules[{package!r}] = None; from gpt2repro.cli import main; sys.exit(main({argv}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"gpt2repro train: error: --log-to {package} needs the {package} package: "
        f"pip install 'gpt2repro[{package}]'"
    )
    assert "Traceback" not in done.stderr
