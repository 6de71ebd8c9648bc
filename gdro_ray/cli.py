"""Command-line flags from config dataclasses: one flag per field, typed by its annotation, helped by its
metadata, so every job's flags are its configs' fields.

Every flag defaults to None ("not given"): a job layers what was given over presets, files and the
dataclass's own defaults (values_given).
"""

import argparse
import dataclasses
import json
import types
import typing


def option(default=dataclasses.MISSING, help: str = "", choices: tuple | None = None, pair_from_one: bool = False,
           aliases: tuple[str, ...] = (), **kwargs):
    """A dataclass field with its flag's help text (and choices, and other names of the flag). pair_from_one:
    a pair field's flag given one value means that value twice ('--scoring-actors 2' is (2, 2))."""
    metadata = {"help": help, **({"choices": choices} if choices else {}), "pair_from_one": pair_from_one,
                "aliases": aliases}
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def add_dataclass_arguments(parser, cls, skip: tuple[str, ...] = ()) -> None:
    """--field-name for every field of cls not in skip (parser: an ArgumentParser or an argument group)."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if item.name in skip:
            continue
        default = item.default if item.default is not dataclasses.MISSING else (
            item.default_factory() if item.default_factory is not dataclasses.MISSING else None)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = item.metadata.get("help", "")
        parser.add_argument("--" + item.name.replace("_", "-"), *item.metadata.get("aliases", ()), dest=item.name,
                            default=None,
                            type=_parser_for(hints[item.name], item.name, item.metadata.get("pair_from_one", False)),
                            choices=item.metadata.get("choices"),
                            help=f"{help_text} (default: {shown})" if shown not in (None, "", {}) else help_text)


def values_given(args: argparse.Namespace, cls, skip: tuple[str, ...] = ()) -> dict:
    """The fields of cls that were given as flags."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def from_arguments(args: argparse.Namespace, cls, skip: tuple[str, ...] = (), **values):
    """cls from its given flags, over the given values, over its defaults."""
    return cls(**{**values, **values_given(args, cls, skip)})


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def base_type(hint):
    """X for X | None."""
    options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(options) == 1:
        return options[0]
    return hint


def _parser_for(hint, name: str, pair_from_one: bool):
    hint = base_type(hint)
    if hint is bool:
        return parse_bool
    if hint is dict or typing.get_origin(hint) is dict:
        return _json_object(name)
    if typing.get_origin(hint) is tuple:
        return _comma_list(hint, pair_from_one)
    return hint


def _comma_list(hint, pair_from_one: bool):
    """'2,8' -> (2, 8); with pair_from_one, '2' -> (2, 2)."""
    arguments = typing.get_args(hint)
    kind, pair = arguments[0], len(arguments) == 2 and arguments[1] is not Ellipsis

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if pair and pair_from_one and len(values) == 1:
            values = values * 2
        return values

    return parse


def _json_object(name: str):
    def parse(text: str) -> dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} must be a JSON object: {error}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} must be a JSON object, got {text!r}")
        return value

    return parse
