"""``gpt2repro export``: a run (or checkpoint) as a Hugging Face model directory, optionally on the hub.

The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json`` and the GPT-2
tokenizer (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``): with
nothing but ``transformers`` installed and no network, ``pipeline("text-generation", model=DIR)``,
``AutoTokenizer.from_pretrained(DIR)`` and lm-evaluation-harness (``--model hf
--model_args pretrained=DIR``) use it as it is.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from gpt2repro.errors import UserError, first_line

log = logging.getLogger("gpt2repro")


def export(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the model of ``source`` (run directory, checkpoint file or HF directory) to ``out``."""
    from gpt2repro.weights import load_pretrained, save_pretrained

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory to write the model into")
    if out.resolve() == Path(source).resolve():
        raise UserError(f"--out {out} is the source itself; export into another directory")
    model = load_pretrained(source)
    save_pretrained(model, out)
    return out


def push_to_hub(directory: Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported directory to the Hugging Face hub; returns the repository's URL."""
    later = f"the export is complete in {directory}: upload it later with `hf upload {repo_id} {directory}`"
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise UserError(f"--push-to-hub needs huggingface_hub (pip install huggingface_hub); {later}") from e
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no", "off"):
        raise UserError(f"--push-to-hub: HF_HUB_OFFLINE is set, no upload possible; {later}")
    try:
        api = HfApi()
        url = api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message="gpt2repro export")
    except Exception as e:  # no network, no token, no write access: the hub's own words, on one line
        raise UserError(
            f"could not push to {repo_id} ({first_line(e, 200)}); "
            f"check the network and `hf auth login`; {later}"
        ) from e
    return str(url)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="a run directory (its latest checkpoint), a checkpoint file or an HF directory",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="the directory to write")
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        default=None,
        help="then upload DIR to this hub repository (org/name; needs `hf auth login`)",
    )
    parser.add_argument("--private", action="store_true", help="create the hub repository as private")
    parser.epilog = "Example: gpt2repro export runs/gpt2-124m --out exports/gpt2-124m"


def run(args: argparse.Namespace) -> int:
    out = export(args.source, args.out)
    print(out)
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        log.info("pushed %s to %s", out, url)
    return 0
