"""``gpt2repro inspect``: pictures of fresh and trained weights, statistics against numpy."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from test_plot import png_size
from tiny_run import MAX_STEPS, make_tiny_run

from gpt2repro import cli
from gpt2repro.config import GPTConfig
from gpt2repro.errors import UserError
from gpt2repro.inspect_weights import (
    find_matrix,
    group_name,
    inspect_model,
    load_model,
    position_embedding_figure,
    weight_heatmap_figure,
    weight_stats,
)
from gpt2repro.model import GPT

FILES = (
    "position_embedding.png",
    "token_embedding_norms.png",
    "weight_heatmap.png",
    "weight_stats.csv",
    "weight_stats.md",
)


@pytest.fixture(scope="module")
def micro() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("gpt2-micro", vocab_pad_multiple=64))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("inspect"))


def test_fresh_model_pictures_and_axes(micro, tmp_path):
    result = inspect_model(micro, tmp_path, matrix_size=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    axes = {name: len(fig.axes) for name, fig in result.figures.items()}
    assert axes == {"position_embedding": 1, "token_embedding_norms": 1, "weight_heatmap": 2}  # + colorbar
    for name, path in result.images.items():
        assert png_size(path) == tuple(int(v * 100) for v in result.figures[name].get_size_inches())
    # n_embd=64 is narrower than the classic columns 150/200/250: three columns spread over the width
    assert [line.get_label() for line in result.figures["position_embedding"].axes[0].get_lines()] == [
        "column 16",
        "column 32",
        "column 48",
    ]


def test_heatmap_shows_openai_layout_of_the_chosen_block(micro):
    """c_attn is nn.Linear (3C, C) here, Conv1D (C, 3C) in OpenAI's files: the picture uses the latter."""
    fig = weight_heatmap_figure(micro, "transformer.h.1.attn.c_attn.weight", size=50)
    shown = fig.axes[0].get_images()[0].get_array()
    expected = micro.transformer.h[1].attn.c_attn.weight.detach().t()[:50, :50].numpy()
    np.testing.assert_array_equal(np.asarray(shown), expected)
    key, wpe = find_matrix(micro, "wpe.weight")
    assert key == "wpe.weight" and wpe.shape == (128, 64)
    with pytest.raises(UserError, match="no such parameter"):
        find_matrix(micro, "h.9.attn.c_attn.weight")
    with pytest.raises(UserError, match="2-D"):
        find_matrix(micro, "h.0.ln_1.bias")
    with pytest.raises(UserError, match="--wpe-columns"):
        position_embedding_figure(micro, [64])


def test_group_stats_match_numpy(micro):
    params = {
        name.removeprefix("transformer."): p.detach().double().numpy() for name, p in micro.named_parameters()
    }
    params["wte.weight"] = params["wte.weight"][: micro.config.vocab_size]  # padded rows are left out
    rows = {r.group: r for r in weight_stats(micro)}
    assert set(rows) == {group_name(n) for n in params}
    assert "lm_head.weight" not in rows  # tied to wte: listed once
    for group, row in rows.items():
        values = np.concatenate([w.ravel() for n, w in params.items() if group_name(n) == group])
        assert row.numel == values.size
        assert row.tensors == sum(group_name(n) == group for n in params)
        assert row.mean == pytest.approx(values.mean(), abs=1e-12)
        assert row.std == pytest.approx(values.std(ddof=1), rel=1e-9, abs=1e-15)
        assert row.max_abs == pytest.approx(np.abs(values).max())
    # the init: N(0, 0.02) for matmuls, 0.02/sqrt(2 n_layer) for residual projections
    assert rows["h.*.attn.c_attn.weight"].std == pytest.approx(0.02, rel=0.02)
    assert rows["h.*.mlp.c_proj.weight"].std == pytest.approx(0.02 / 2, rel=0.02)


def test_cli_on_trained_run_and_hf_directory(run_dir, tmp_path, capsys):
    out = tmp_path / "trained"
    assert cli.main(["inspect", "--model", str(run_dir), "--out", str(out), "--per-layer"]) == 0
    printed = capsys.readouterr().out
    assert "| `h.1.attn.c_attn.weight` |" in printed and str(out / "weight_heatmap.png") in printed
    _, label = load_model(str(run_dir), None)
    assert label == f"({run_dir.name}, step {MAX_STEPS})"
    for name in FILES:
        assert (out / name).stat().st_size > 0
    png_size(out / "weight_heatmap.png")
    with open(out / "weight_stats.csv") as f:
        table = {row["group"]: row for row in csv.DictReader(f)}
    trained = GPT.from_pretrained(run_dir)
    wpe = trained.transformer.wpe.weight.detach().double()
    assert float(table["wpe.weight"]["std"]) == pytest.approx(wpe.std().item(), rel=1e-9)
    # the same weights through the Hugging Face layout (Conv1D transposes) give the same statistics
    hf_dir = tmp_path / "hf"
    trained.save_pretrained(hf_dir)
    via_hf, _ = load_model(str(hf_dir), None)
    assert [r.std for r in weight_stats(via_hf)] == pytest.approx([r.std for r in weight_stats(trained)])


def test_cli_fresh_preset_and_errors(tmp_path, capsys):
    out = tmp_path / "fresh"
    args = ["inspect", "--model-preset", "gpt2-micro", "--out", str(out), "--matrix-size", "64"]
    assert cli.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    a, _ = load_model(None, "gpt2-micro", seed=3)
    b, _ = load_model(None, "gpt2-micro", seed=3)
    torch.testing.assert_close(a.transformer.wpe.weight, b.transformer.wpe.weight)
    assert cli.main(["inspect", "--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert cli.main(["inspect", "--model-preset", "gpt2-micro", "--out", str(out), "--matrix", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("gpt2repro inspect: error:") == 2
