"""reStructuredText for an `argparse` parser: usage, description and every option as
a Sphinx ``option`` (so ``:option:`dispynb-node --cpus``` links to it, and the
search finds it). Used for the command-line programs and the magics, so their
reference is their parser and cannot drift from it."""

from __future__ import annotations

import argparse
import inspect
import re

WIDTH = 88

_SPECIAL = re.compile(r"([^\w\s])")


def escape(text: str) -> str:
    """``text`` as literal reStructuredText (help texts are plain text)."""
    return _SPECIAL.sub(r"\\\1", " ".join(text.split()))


def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(parser.prog, width=WIDTH)


def usage(parser: argparse.ArgumentParser) -> str:
    formatter = _formatter(parser)
    formatter.add_usage(
        parser.usage, parser._actions, parser._mutually_exclusive_groups
    )
    return formatter.format_help().strip()


def parser_rst(
    parser: argparse.ArgumentParser,
    prog: str | None = None,
    *,
    description_is_rst: bool = False,
    heading: str = "",
    xref: bool = True,
) -> list[str]:
    """The lines documenting ``parser`` (and its subcommands, each under a heading
    made of ``heading`` characters, if given). With ``xref``, options are Sphinx
    ``option`` objects of a ``program`` (linkable, indexed); without (the magics,
    whose ``%`` names Sphinx cannot use in ids), a definition list."""
    if prog:
        parser.prog = prog
    lines = [f".. program:: {parser.prog}", ""] if xref else []
    lines += [".. code-block:: text", ""]
    lines += ["   " + line for line in usage(parser).splitlines()]
    lines.append("")
    if parser.description:
        if description_is_rst:
            lines += inspect.cleandoc(parser.description).splitlines()
        else:
            lines.append(escape(parser.description))
        lines.append("")
    subcommands: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    sub.description = helps[name]
                subcommands.append((name, sub))
            continue
        lines += _option(parser, action, xref)
    if parser.epilog:
        lines += [escape(parser.epilog), ""]
    for name, sub in subcommands:
        title = f"``{parser.prog} {name}``"
        if heading:
            lines += [title, heading * len(title), ""]
        lines += parser_rst(sub, f"{parser.prog} {name}", heading=heading, xref=xref)
    return lines


def _option(
    parser: argparse.ArgumentParser, action: argparse.Action, xref: bool
) -> list[str]:
    formatter = _formatter(parser)
    signature = formatter._format_action_invocation(action)
    if not action.option_strings and action.choices:
        signature = signature.strip("{}").replace(",", " | ")
    lines = [f".. option:: {signature}", ""] if xref else [f"``{signature}``"]
    if action.help and action.help != argparse.SUPPRESS:
        lines.append("   " + escape(formatter._expand_help(action)))
    if action.choices and action.option_strings:
        choices = ", ".join(f"``{c}``" for c in action.choices)
        lines += ["", f"   One of {choices}."]
    if action.required and action.option_strings:
        lines += ["", "   Required."]
    lines.append("")
    return lines
