"""The ``gpt2repro`` command: one sub-command per job, each defined next to the code it drives.

Every sub-command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Mistakes a user can
fix (``UserError``) become one line on stderr and exit code 2, never a traceback; so does any ``OSError``
that reaches ``main`` (a full or read-only disk, a missing permission): its path and cause in one line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gpt2repro.errors import UserError
from gpt2repro.files import user_error_for

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("gpt2repro.prepare", "tokenize a corpus into GPT-2 token shards"),
    "train": ("gpt2repro.train", "train GPT-2 (single device, DDP under torchrun), with exact resume"),
    "sample": ("gpt2repro.sample", "generate text from a model"),
    "eval": ("gpt2repro.evals.cli", "HellaSwag, WikiText-2, LAMBADA, validation loss"),
    "plot": ("gpt2repro.plot", "plot loss/HellaSwag curves of one or more runs"),
    "inspect": ("gpt2repro.inspect_weights", "pictures and statistics of a model's weights"),
    "export": ("gpt2repro.export", "a run as a Hugging Face model directory (weights, config, tokenizer)"),
    "doctor": ("gpt2repro.doctor", "check this machine: every CUDA/CPU path a run needs, with timings"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser of ``command`` only: importing every sub-command (torch, matplotlib, …) would
    slow down each call by seconds, and the top-level help needs just the names."""
    parser = argparse.ArgumentParser(
        prog="gpt2repro", description="GPT-2 end to end: prepare data, train, sample, evaluate, plot."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    args.argv = argv  # the exact command, for messages that say how to run it again
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"gpt2repro {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a fault no module turned into a UserError: still one line, not a traceback
        action = "access" if e.filename is not None else f"finish `gpt2repro {args.command}`"
        print(f"gpt2repro {args.command}: error: {user_error_for(e, action)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2repro {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
