"""Two gloo processes sharding the examples give the single-process results (HellaSwag, LAMBADA, WikiText;
both styles where there are two)."""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt2repro.config import GPTConfig
from gpt2repro.evals.hellaswag import evaluate_hellaswag
from gpt2repro.evals.lambada import evaluate_lambada
from gpt2repro.evals.perplexity import document_perplexity, read_text
from gpt2repro.evals.scoring import EvalSetup
from gpt2repro.evals.wikitext import harness_perplexity, split_pages
from gpt2repro.model import GPT

WORLD = 2
DERIVED = "hellaswag/derived-not-original/hellaswag_val_full.txt.bz2"


def write_inputs(shared_data: Path, out: Path) -> Path:
    """Small copies of the three data files, so the spawned processes do not each unpack the bz2."""
    out.mkdir()
    derived = bz2.decompress((shared_data / DERIVED).read_bytes()).decode("utf-8").split("\n")
    (out / "hellaswag.txt").write_text("\n".join(derived[: 9 * 6]) + "\n")
    lambada = (shared_data / "lambada" / "lambada_test.jsonl").read_text(encoding="utf-8").splitlines()
    (out / "lambada.jsonl").write_text("\n".join(lambada[:7]) + "\n")
    pages = split_pages(read_text(shared_data / "wikitext-2-raw" / "wiki.test.raw"))
    (out / "wiki.txt").write_text("\n".join(page[:1000] for page in pages[:3]))  # 3 short pages
    return out


def run_all(inputs: Path, rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2-micro")).eval()

    def setup(batch_size: int) -> EvalSetup:
        return EvalSetup(batch_size, "cpu", "fp32", rank, world_size)

    wiki = read_text(inputs / "wiki.txt")
    return {
        "hellaswag": evaluate_hellaswag(model, inputs / "hellaswag.txt", setup(2)),
        "lambada": evaluate_lambada(model, inputs / "lambada.jsonl", setup(3)),
        "lambada_harness": evaluate_lambada(model, inputs / "lambada.jsonl", setup(3), style="harness"),
        "wikitext2": document_perplexity(model, wiki, setup(2)),
        "wikitext2_harness": harness_perplexity(model, wiki, setup(2), context=64),
    }


def worker(rank: int, init_file: str, inputs: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        result = run_all(Path(inputs), rank, WORLD)
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path, shared_data):
    inputs = write_inputs(shared_data, tmp_path / "inputs")
    mp.spawn(worker, args=(str(tmp_path / "init"), str(inputs), str(tmp_path)), nprocs=WORLD, join=True)
    single = run_all(inputs, 0, 1)
    for rank in range(WORLD):
        sharded = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for task, expected in single.items():
            got = sharded[task]
            assert got["n"] == expected["n"]
            for key in ("acc", "acc_norm", "ppl", "loss", "word_ppl", "bpb"):
                if key in expected:
                    assert got[key] == pytest.approx(expected[key], rel=1e-6), (task, key)
    assert single["hellaswag"]["n"] == 9 and single["lambada"]["n"] == 7
    assert single["wikitext2"]["windows"] > 2  # both ranks really had windows to score
    assert single["wikitext2_harness"]["pages"] > 1 and single["wikitext2_harness"]["windows"] > 2
