"""Command-line options generated from RunConfig's fields: one declaration per option (in
edgezo/config/options.py), so the CLI and the config cannot drift apart.

Every generated option defaults to None, meaning "not given": the command line then
overrides only what the user typed, on top of `--config FILE` or the defaults. The help
shows each option's real default, its section as a panel.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any

import typer

from edgezo.config.options import FIELDS, SECTION_OF
from edgezo.config.runconfig import RunConfig

_KW = inspect.Parameter.KEYWORD_ONLY


def flag_of(name: str) -> str:
    """The option's spelling: its metadata's flag, or --name (bools: --name/--no-name)."""
    meta = FIELDS[name].metadata
    if meta["flag"]:
        return meta["flag"]
    flag = "--" + name.replace("_", "-")
    return f"{flag}/--no-{flag[2:]}" if _cli_type(name) is bool else flag


def _cli_type(name: str) -> type:
    """What the command line parses: the field's scalar type; lists and betas as text."""
    hint = typing.get_type_hints(_owner(name))[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = typing.get_origin(args[0]) or args[0]
    return kind if kind in (bool, int, float, str) else str


def _owner(name: str) -> type:
    from edgezo.config.options import SECTIONS

    return SECTIONS[SECTION_OF[name]]


def _shown_default(name: str) -> str:
    f = FIELDS[name]
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    if default is None or default == []:
        return ""
    if isinstance(default, bool):
        return ""  # the flag's two spellings say it
    return str(default)


def option_parameter(name: str) -> inspect.Parameter:
    f = FIELDS[name]
    kind = _cli_type(name)
    opt = typer.Option(None, *flag_of(name).split(" "), help=f.metadata["help"],
                       show_default=_shown_default(name) or False,
                       rich_help_panel=SECTION_OF[name].capitalize())
    return inspect.Parameter(name, _KW, default=opt, annotation=kind | None)


def cli_fields(sections: tuple[str, ...] | None = None,
               names: tuple[str, ...] | None = None) -> list[str]:
    """Config options a command exposes: every CLI field of the given sections, or the
    named ones."""
    return [n for n, s in SECTION_OF.items() if FIELDS[n].metadata["cli"]
            and (names is None or n in names) and (sections is None or s in sections)]


def config_command(fields: list[str], extra: dict[str, tuple[Any, Any]]):
    """Decorate `fn(ctx, options: dict, **extra)`: a typer command taking the config
    `fields` as --options (collected into `options`, only those given) plus `extra`
    parameters (name -> (annotation, typer.Option/Argument))."""
    def wrap(fn: Callable) -> Callable:
        def command(ctx: typer.Context, **kwargs):
            given = {n: kwargs.pop(n) for n in fields if kwargs.get(n) is not None}
            for n in fields:
                kwargs.pop(n, None)
            return fn(ctx, given, **kwargs)

        params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=typer.Context)]
        params += [inspect.Parameter(n, _KW, default=d, annotation=a)
                   for n, (a, d) in extra.items()]
        params += [option_parameter(n) for n in fields]
        command.__signature__ = inspect.Signature(params)
        command.__name__, command.__doc__ = fn.__name__, fn.__doc__
        return command
    return wrap


def build_config(given: dict, config_file: str | None) -> RunConfig:
    """The recipe file (if any) with the given options on top."""
    base = RunConfig.from_file(config_file) if config_file else RunConfig()
    return base.override(**given)  # override coerces each value to its field's type
