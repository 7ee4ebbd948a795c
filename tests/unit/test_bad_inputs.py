"""Bad input and faults, per sub-command: exit code 2, no traceback, one line that names the culprit.

Each row is ``argv`` (placeholders ``{name}`` are the files made by the ``env`` fixture) and a substring the
error line must contain, naming the offending option or file. A new option gets covered by adding a row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fs_faults import fill, mount_tmpfs, unmount

from gpt2repro import prepare
from gpt2repro.cli import main
from gpt2repro.data import HEADER_BYTES, shard_paths

DOCS = [f"document {i}: " + "plain words and numbers 12345, " * (i % 9 + 3) for i in range(120)]
MICRO = ["--model-preset", "gpt2-micro"]
TRAIN = [
    "train", "--data", "{data}", "--out", "{out}", "--model", "gpt2-micro", "--seq-len", "16",
    "--micro-batch", "2", "--total-batch", "32", "--max-steps", "1", "--device", "cpu", "--dtype", "fp32",
    "--compile", "false", "--eval-every", "0", "--eval-tokens", "32", "--sample-every", "0",
    "--num-samples", "0", "--checkpoint-every", "0", "--warmup-steps", "0",
]  # fmt: skip
SAMPLE = ["sample", *MICRO, "--max-new-tokens", "2", "--device", "cpu", "--dtype", "fp32"]
EVAL = ["eval", *MICRO, "--device", "cpu", "--dtype", "fp32", "--no-progress"]
EVAL_VAL = [*EVAL, "--task", "val", "--data", "{data}", "--context", "16", "--limit", "64"]
INSPECT = ["inspect", *MICRO, "--matrix-size", "8"]


PREPARE_ROWS = [
    (["prepare", "--source", "embedded"], "--out DIR is required"),
    (["prepare", "--out", "{a_file}"], "--out {a_file} is a file"),
    (["prepare", "--out", "{a_file}/sub"], "{a_file}/sub"),
    (["prepare", "--out", "{out}", "--shard-tokens", "0"], "--shard-tokens"),
    (["prepare", "--out", "{out}", "--val-tokens", "-5"], "--val-tokens"),
    (["prepare", "--out", "{out}", "--max-tokens", "0"], "--max-tokens"),
    (["prepare", "--out", "{out}", "--workers", "0"], "--workers"),
    (["prepare", "--out", "{out}", "--shard-tokens", "many"], "--shard-tokens"),
    (["prepare", "--out", "{out}", "--source", "files"], "--source files needs at least one PATH"),
    (["prepare", "--out", "{out}", "stray.txt"], "PATH arguments are only for --source files"),
    (["prepare", "--out", "{out}", "--source", "files", "{missing}"], "{missing} does not exist"),
    (["prepare", "--out", "{out}", "--source", "files", "{latin1_txt}"], "{latin1_txt} is not UTF-8"),
    (["prepare", "--out", "{out}", "--source", "files", "{bad_jsonl}"], "{bad_jsonl}:2 is not valid JSON"),
    (["prepare", "--out", "{out}", "--source", "files", "{notext_jsonl}"], "{notext_jsonl}:1 has no string"),
    (["prepare", "--out", "{out}", "--source", "files", "{gz}"], "{gz} is compressed"),
    (["prepare", "--out", "{out}", "--source", "files", "{binary}"], "{binary} is not UTF-8"),
    (["prepare", "--out", "{out}", "--source", "files", "{empty_dir}"], "directory {empty_dir} holds no"),
    (["prepare", "--out", "{data}"], "{data} already holds a prepared dataset"),
    (["prepare", "--out", "{ro}/data"], "{ro}/data: the file system is read-only"),
    (["prepare", "--out", "{full}/data"], "{full}/data: no space left on the device"),
    (["prepare", "--verify", "{missing}"], "{missing} does not exist"),
    (["prepare", "--verify", "{data}", "--out", "{out}"], "--verify DIR checks an existing dataset"),
    (["prepare", "--verify", "{corrupt}"], "corrupt_train_000001.bin does not match the sha256"),
    (["prepare", "--verify", "{bad_token}"], "contains token id 60000 >= 50257"),
    (["prepare", "--verify", "{no_split}"], "manifest.json:"),
    (["prepare", "--verify", "{latin1_manifest}"], "manifest.json:3: the manifest is not UTF-8"),
]

TRAIN_ROWS = [
    ([*TRAIN, "--lr", "inf"], "--lr must be a finite number"),
    ([*TRAIN, "--lr", "nan"], "--lr must be a finite number"),
    ([*TRAIN, "--lr=-1e-3"], "--lr must be positive"),
    ([*TRAIN, "--lr", "fast"], "lr must be a float"),
    ([*TRAIN, "--micro-batch", "0"], "--micro-batch must be positive"),
    ([*TRAIN, "--seq-len", "0"], "--seq-len must be positive"),
    ([*TRAIN, "--seq-len", "256"], "--seq-len 256 is longer than the model's context"),
    ([*TRAIN, "--total-batch", "48"], "--total-batch 48 is not a multiple"),
    ([*TRAIN, "--max-steps", "0"], "--max-steps must be positive"),
    ([*TRAIN, "--max-steps", "1.5"], "max-steps must be an int"),
    ([*TRAIN, "--dropout", "1.5"], "--dropout must be in [0, 1)"),
    ([*TRAIN, "--beta1", "1"], "--beta1/--beta2"),
    ([*TRAIN, "--eps", "nan"], "--eps must be a finite number"),
    ([*TRAIN, "--grad-clip", "inf"], "--grad-clip must be a finite number"),
    ([*TRAIN, "--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    ([*TRAIN, "--min-lr-ratio", "2"], "--min-lr-ratio must be in [0, 1]"),
    ([*TRAIN, "--time-limit", "-1"], "--time-limit must be >= 0"),
    ([*TRAIN, "--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    ([*TRAIN, "--dtype", "fp8"], "--dtype must be one of"),
    ([*TRAIN, "--compile", "maybe"], "--compile must be one of"),
    ([*TRAIN, "--model", "gpt5"], "unknown --model 'gpt5'"),
    ([*TRAIN, "--nonsense", "1"], "unrecognized arguments: --nonsense"),
    ([*TRAIN, "--data", ""], "no training data: pass --data"),
    ([*TRAIN, "--data", "{missing}"], "data directory {missing} does not exist"),
    ([*TRAIN, "--preset", "{latin1_toml}"], "{latin1_toml}:2: preset is not UTF-8"),
    ([*TRAIN, "--preset", "{bad_toml}"], "{bad_toml}"),
    ([*TRAIN, "--preset", "{unknown_field_toml}"], "unknown training field 'learning_rate'"),
    ([*TRAIN, "--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    ([*TRAIN, "--out", "{ro}/run"], "{ro}/run"),
    ([*TRAIN, "--out", "{a_file}"], "{a_file}"),
    ([*TRAIN, "--data", "{corrupt}"], "corrupt_train_000001.bin does not match the sha256"),
    ([*TRAIN, "--data", "{bad_token}"], "contains token id 60000"),
    ([*TRAIN, "--data", "{corrupt_val}"], "flipped_val_000000.bin does not match the sha256"),
    ([*TRAIN, "--resume", "{run}/config.json"], "--resume"),
]  # fmt: skip

SAMPLE_ROWS = [
    ([*SAMPLE, "--temperature", "nan"], "--temperature must be a finite number"),
    ([*SAMPLE, "--temperature", "inf"], "--temperature must be a finite number"),
    ([*SAMPLE, "--temperature", "-1"], "--temperature must be >= 0"),
    ([*SAMPLE, "--top-p", "nan"], "--top-p must be a finite number"),
    ([*SAMPLE, "--top-p", "0"], "--top-p must be in (0, 1]"),
    ([*SAMPLE, "--top-k", "0"], "--top-k must be a positive integer"),
    ([*SAMPLE, "--top-k", "many"], "argument --top-k"),
    ([*SAMPLE, "--num-samples", "0"], "--num-samples must be at least 1"),
    ([*SAMPLE, "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ([*SAMPLE, "--dtype", "fp8"], "unknown dtype 'fp8'"),
    ([*SAMPLE, "--device", "tpu9"], "unknown device 'tpu9'"),
    (["sample", "--model-preset", "gpt2-huge"], "unknown model preset 'gpt2-huge'"),
    (["sample", "--model", "{missing}"], "{missing}"),
    (["sample", "--model", "{garbage_pt}"], "{garbage_pt}"),
    (["sample", "--model", "{empty_dir}"], "{empty_dir}"),
]

EVAL_ROWS = [
    ([*EVAL, "--task", "val"], "--task val needs --data"),
    ([*EVAL, "--task", "val", "--data", "{a_file}"], "--data {a_file} is not a directory"),
    ([*EVAL, "--task", "nosuch"], "argument --task"),
    ([*EVAL_VAL, "--limit", "0"], "--limit must be a positive integer"),
    ([*EVAL_VAL, "--json", "{ro}/result.json"], "{ro}/result.json"),
    ([*EVAL_VAL, "--json", "{full}/result.json"], "no space left on the device"),
    ([*EVAL_VAL, "--json", "{a_file}/result.json"], "{a_file}"),
    ([*EVAL, "--task", "val", "--data", "{empty_dir}"], "no val shards"),
    ([*EVAL_VAL, "--batch-size", "0"], "--batch-size"),
    ([*EVAL, "--task", "wikitext2", "--data", "{wiki}", "--stride", "0"], "--stride"),
    ([*EVAL, "--task", "val", "--data", "{corrupt_val}", "--context", "16", "--limit", "64"],
     "does not match the sha256"),
]  # fmt: skip

PLOT_ROWS = [
    (["plot", "{missing}"], "run directory {missing} does not exist"),
    (["plot", "{empty_dir}"], "log.jsonl not found"),
    (["plot", "{empty_log_run}"], "is empty: nothing to plot"),
    (["plot", "{run}", "--out", "{out}/plot.jpg"], "only PNG output is supported"),
    (["plot", "{run}", "--dpi", "0"], "--dpi must be positive"),
    (["plot", "{run}", "--smoothing", "1.5"], "--smoothing must be in [0, 1)"),
    (["plot", "{run}", "--smoothing", "nan"], "--smoothing must be in [0, 1)"),
    (["plot", "{run}", "--out", "{ro}/plot.png"], "the plot {ro}/plot.png: the file system is read"),
    (["plot", "{run}", "--out", "{full}/plot.png"], "cannot write the plot {full}/plot.png: no space left"),
    (["plot", "{run}", "--out", "{a_file}/plot.png"], "cannot write the plot {a_file}/plot.png"),
]  # fmt: skip

INSPECT_ROWS = [
    ([*INSPECT, "--out", "{a_file}"], "--out {a_file} is a file"),
    ([*INSPECT, "--out", "{a_file}/sub"], "{a_file}/sub"),
    ([*INSPECT, "--out", "{ro}/pics"], "{ro}/pics: the file system is read-only"),
    ([*INSPECT, "--out", "{full}/pics"], "{full}/pics: no space left on the device"),
    ([*INSPECT, "--out", "{out}", "--dpi", "0"], "--dpi must be positive"),
    ([*INSPECT, "--out", "{out}", "--matrix-size", "0"], "--matrix-size must be positive"),
    ([*INSPECT, "--out", "{out}", "--wpe-columns", "a,b"], "--wpe-columns"),
    ([*INSPECT, "--out", "{out}", "--wpe-columns", "9999"], "--wpe-columns"),
    ([*INSPECT, "--out", "{out}", "--matrix", "h.0.nothing.weight"], "h.0.nothing.weight"),
    (["inspect", "--model", "{missing}", "--out", "{out}"], "{missing}"),
    (["inspect", "--model-preset", "gpt2-huge", "--out", "{out}"], "argument --model-preset"),
]

ROWS = PREPARE_ROWS + TRAIN_ROWS + SAMPLE_ROWS + EVAL_ROWS + PLOT_ROWS + INSPECT_ROWS


# ---------------------------------------------------------------- the files the rows name
def _copy_dataset(src: Path, dst: Path, prefix: str) -> Path:
    """A copy of the dataset whose shards are renamed ``PREFIX_…`` (so a message names which copy)."""
    dst.mkdir()
    manifest = json.loads((src / "manifest.json").read_text())
    for shard in manifest["shards"]:
        new = shard["name"].replace("corpus", prefix, 1)
        (dst / new).write_bytes((src / shard["name"]).read_bytes())
        shard["name"] = new
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _datasets(root: Path) -> dict[str, Path]:
    data = root / "data"
    prepare.prepare_corpus(DOCS, data, shard_tokens=1500, val_tokens=600, workers=1)
    corrupt = _copy_dataset(data, root / "corrupt", "corrupt")
    _poke(shard_paths(corrupt, "train")[0], HEADER_BYTES + 100, b"\0" * 200)  # zeroed: valid ids, bad sha
    bad_token = _copy_dataset(data, root / "bad_token", "badtoken")
    last = shard_paths(bad_token, "train")[-1]
    _poke(last, last.stat().st_size - 2, (60000).to_bytes(2, "little"))  # the very last token
    corrupt_val = _copy_dataset(data, root / "corrupt_val", "flipped")
    _poke(shard_paths(corrupt_val, "val")[0], HEADER_BYTES + 10, b"\0" * 20)
    no_split = _copy_dataset(data, root / "no_split", "nosplit")
    manifest = json.loads((no_split / "manifest.json").read_text())
    del manifest["shards"][1]["split"]
    (no_split / "manifest.json").write_text(json.dumps(manifest, indent=2))
    latin1 = _copy_dataset(data, root / "latin1_manifest", "latin")
    text = (latin1 / "manifest.json").read_text().replace('"corpus"', '"caf\xe9"')
    (latin1 / "manifest.json").write_bytes(text.encode("latin-1"))
    return dict(data=data, corrupt=corrupt, bad_token=bad_token, corrupt_val=corrupt_val, no_split=no_split,
                latin1_manifest=latin1)  # fmt: skip


def _runs(root: Path) -> dict[str, Path]:
    run = root / "run"
    run.mkdir()
    records = [{"step": s, "kind": "train", "train_loss": 5.0 - s / 10, "tokens": 32 * s, "lr": 1e-3,
                "tokens_per_s": 100.0} for s in range(1, 6)]  # fmt: skip
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.json").write_text(json.dumps({"data": "nowhere"}))
    empty = root / "empty_log_run"
    empty.mkdir()
    (empty / "log.jsonl").write_text("")
    return dict(run=run, empty_log_run=empty)


def _files(root: Path) -> dict[str, Path]:
    files = {
        "a_file": b"just a file\n",
        "latin1.txt": "caf\xe9 au lait\n".encode("latin-1"),
        "bad.jsonl": b'{"text": "ok"}\n{"text": oops}\n',
        "notext.jsonl": b'{"body": "no text"}\n',
        "x.txt.gz": b"\x1f\x8b\x08\x00",
        "binary.bin": bytes(range(256)) * 4,
        "garbage.pt": os.urandom(4096),
        "latin1.toml": "lr = 1e-3\n# caf\xe9\n".encode("latin-1"),
        "bad.toml": b"lr = = 1\n",
        "unknown_field.toml": b"learning_rate = 1e-3\n",
        "wiki.test.raw": b" = Title = \n\n Some text of an article .\n" * 50,
    }
    out = {}
    for name, content in files.items():
        (root / name).write_bytes(content)
        out[name.replace(".txt.gz", "_gz").replace(".test.raw", "").replace(".", "_")] = root / name
    (root / "empty_dir").mkdir()
    return {**out, "gz": root / "x.txt.gz", "binary": root / "binary.bin", "empty_dir": root / "empty_dir",
            "missing": root / "missing" / "nothing"}  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Paths for the placeholders; ``ro``/``full`` are real tmpfs mounts (None with the reason if none)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    paths = {**_datasets(root), **_runs(root), **_files(root)}
    mounts = []
    for name, options in (("ro", "size=1m"), ("full", "size=1m")):
        reason = mount_tmpfs(root / name, options)
        if reason is None:
            mounts.append(root / name)
            if name == "full":
                fill(root / name)
            else:
                os.system(f"mount -o remount,ro {root / name}")
        paths[name] = None if reason else root / name
        paths[f"{name}_reason"] = reason
    yield paths
    for mount in mounts:
        unmount(mount)


def _substitute(items: list[str], paths: dict, out: Path) -> list[str]:
    values = {k: str(v) for k, v in paths.items() if isinstance(v, Path)} | {"out": str(out)}
    for needed in ("ro", "full"):
        if any(f"{{{needed}}}" in item for item in items) and paths[needed] is None:
            pytest.skip(f"needs a {needed} tmpfs: {paths[f'{needed}_reason']}")
    return [item.format(**values) for item in items]


@pytest.mark.parametrize(("argv", "expected"), ROWS)
def test_bad_input_is_one_line_and_exit_2(env, tmp_path, capsys, argv, expected):
    out = tmp_path / "out"
    argv = _substitute(argv, env, out)
    [expected] = _substitute([expected], env, out)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (usage line + one error line)
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1, err
    assert errors[0].startswith((f"gpt2repro {argv[0]}: error: ", "gpt2repro: error: ")), errors[0]
    assert expected in errors[0], errors[0]
    if argv[0] == "train":  # refused before any training: no step logged, no checkpoint
        assert not (out / "log.jsonl").exists() and not list(out.glob("checkpoints/*.pt"))


def test_the_table_covers_every_sub_command_with_60_rows():
    assert len(ROWS) >= 60
    assert {row.values[0][0] if hasattr(row, "marks") else row[0][0] for row in ROWS} == {
        "prepare", "train", "sample", "eval", "plot", "inspect"}  # fmt: skip
