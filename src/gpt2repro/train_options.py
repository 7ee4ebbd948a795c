"""``TrainConfig`` on the command line: one ``--flag`` per field, each with its doc, its default and, when
``--preset P`` comes before ``--help``, the preset's value; and the flags actually given, as overrides."""

from __future__ import annotations

import argparse
import dataclasses

from gpt2repro.errors import UserError
from gpt2repro.train_config import FIELD_TYPES, TrainConfig, flag_name, load_preset


def _help_text(f: dataclasses.Field, preset_values: dict | None = None, preset: str | None = None) -> str:
    text = f"{f.metadata['help']} (default {_show(f.default)}"
    if preset_values is not None and f.name in preset_values:
        text += f"; preset {preset}: {_show(preset_values[f.name])}"
    return (text + ")").replace("%", "%%")  # argparse %-formats help strings


def _show(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if value == "" else str(value)


class _HelpWithPreset(argparse.Action):
    """``-h``: prints the help; with ``--preset NAME`` before it, each field shows the preset's value too."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)
        self.field_actions: list[tuple[dataclasses.Field, argparse.Action]] = []  # set by add_field_arguments

    def __call__(self, parser, namespace, values, option_string=None):
        preset = getattr(namespace, "preset", None)
        if preset:
            try:
                preset_values = load_preset(preset)
            except UserError as e:
                parser.error(str(e))
            for f, action in self.field_actions:
                action.help = _help_text(f, preset_values, preset)
        parser.print_help()
        parser.exit()


def add_field_arguments(parser: argparse.ArgumentParser) -> None:
    """``--field-name VALUE`` for every TrainConfig field (strings here; typed in ``resolve``), each with
    its doc and default; ``--preset NAME --help`` adds the preset's values."""
    replaces_help = parser.add_argument_group(conflict_handler="resolve")  # argparse's own -h goes
    help_action = replaces_help.add_argument(
        "-h",
        "--help",
        action=_HelpWithPreset,
        help="show this help and exit (after --preset NAME: its values too)",
    )
    group = parser.add_argument_group("training fields (override the preset)")
    for f in dataclasses.fields(TrainConfig):
        action = group.add_argument(
            f"--{flag_name(f.name)}",
            dest=f"field_{f.name}",
            default=None,
            metavar=FIELD_TYPES[f.name].__name__.upper(),
            help=_help_text(f),
        )
        help_action.field_actions.append((f, action))


def overrides_from_args(args: argparse.Namespace) -> dict[str, str]:
    return {
        f.name: getattr(args, f"field_{f.name}")
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f"field_{f.name}", None) is not None
    }
