"""How the magics read what a person typed, and say what went wrong.

`parse_line` names a misspelt option with the likely one; `adapt_bounds`, `unquote`
and `last_function` read an option's value, an expression and a cell; `cell_origin`
finds the notebook cell (prompt number, lines before the body) a ``%%dispy`` runs
in, so that its body compiles under the lines the person sees; `friendly_errors`
turns dispynb's errors into a `MagicError` of a line or two with the fix.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import difflib
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

from IPython.core.error import UsageError

from dispynb.errors import (
    ConfigurationError,
    DispynbError,
    SerializationError,
    SetupError,
)
from dispynb.jupyter.errors import MagicError
from dispynb.jupyter.ownmodules import own_module_hint
from dispynb.jupyter.tracebacks import SourceMap

__all__ = [
    "Adapt",
    "adapt_bounds",
    "callers_of",
    "cell_origin",
    "friendly_errors",
    "last_function",
    "nodes_words",
    "parse_line",
    "unquote",
]


def cell_origin(shell: Any, cell: str) -> tuple[int | None, list[str]]:
    """The prompt number of the notebook cell running this ``%%dispy`` and its
    lines before ``cell`` (the magic line); ``(None, [])`` when the magic was not
    called from a stored cell (e.g. ``run_cell_magic`` from code)."""
    history = getattr(shell, "history_manager", None)
    stored = getattr(history, "input_hist_raw", None)
    if not stored:
        return None, []
    raw = str(stored[-1])
    body = cell.rstrip()
    where = raw.rfind(body) if body else -1
    if where < 0 or not raw.lstrip().startswith("%%dispy"):
        return None, []
    # IPython counted this cell before running it: its number is one less.
    return int(shell.execution_count) - 1, raw[:where].splitlines()


def parse_line(magic: Callable[..., Any], line: str) -> Any:
    """Parse ``line`` for ``magic``; an unknown option is named, with the likely
    one (``unknown option --ovr; did you mean --over?``). A word that starts with
    ``#`` (unquoted) begins a comment, which is ignored."""
    from IPython.utils.process import arg_split

    parser = magic.parser  # type: ignore[attr-defined]
    known = sorted(parser._option_string_actions)
    try:
        words = arg_split(line, strict=True)
    except ValueError as exc:
        raise UsageError(f"cannot parse {line!r}: {exc}") from None
    for index, word in enumerate(words):
        if word.startswith("#"):  # a comment, as %dispy?'s examples have
            words = words[:index]
            break
    for word in words:
        option = word.split("=", 1)[0]
        if not option.startswith("--") or option == "--":
            continue
        if option == "--secret" and "--secret" not in known:
            # dispy's secret=: argparse would take it for --secret-file, and a
            # secret quoted back in an error is saved with the notebook.
            raise UsageError(
                "--secret: a secret on the magic line would be saved with the "
                "notebook: write it to a file (chmod 600) and pass --secret-file "
                "FILE, or set DISPYNB_SECRET in the kernel's environment"
            )
        if option in known or len([k for k in known if k.startswith(option)]) == 1:
            continue  # exact, or an unambiguous abbreviation (argparse takes it)
        close = difflib.get_close_matches(option, known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"unknown option {option}{hint} (see %{parser.prog}?)")
    return parser.parse_args(words)


@contextlib.contextmanager
def friendly_errors(
    what: str, hint: str, sources: SourceMap | None = None
) -> Iterator[None]:
    """Turn dispynb's errors (and OS errors) into a `MagicError`: one or two lines
    that say what failed and how to fix it, without the internal frames.

    ``hint`` (how to get usable nodes) is left out for a failure of the person's
    code: a pickling error, or a setup that raised, whose remote traceback follows,
    its frames put back in their cells by ``sources``."""
    # A node that cannot be used is logged too: say it once, in the error, when
    # nothing could start; log it (after the fact) when the others could.
    held = _HoldRecords()
    for name in _HELD_LOGGERS:
        logging.getLogger(name).addFilter(held)
    try:
        yield
    except (MagicError, UsageError):
        raise
    except (DispynbError, OSError) as exc:
        # The error is the first node's: when several nodes could not be reached,
        # name every one (a failing setup or pickling fails alike on each), the
        # others' reasons being the argument of the "no node" record.
        others = [r.args for r in held.records if str(r.msg).startswith(_NO_NODE)]
        held.records.clear()
        message = f"{what}: {exc}"
        if others and isinstance(others[-1], tuple) and others[-1]:
            message = f"{what}: {others[-1][0]}; {exc}"
        if isinstance(exc, SerializationError | SetupError):
            message = f"{what}: {exc}"
            hint = ""  # the code, what it captures or its setup: not the nodes
        if isinstance(exc, SetupError) and exc.remote_traceback:
            remote = exc.remote_traceback.rstrip()
            shown = (sources.rerender(remote) if sources else remote).strip()
            # No frame of the person's left (a load that failed in dispynb's own
            # code): its last line says what the message says already.
            if "\n" in shown or shown not in message:
                message += "\n" + shown
        own = own_module_hint(message)
        if own:  # the nodes are fine: they lack a module of the person's
            # (in %%dispy's words only: not also the node's "send it with depends")
            message = message.replace(_NODE_MODULE_ADVICE, "")
            message, hint = f"{message}\n{own.rstrip()}", ""
        raise MagicError(f"{message}\n{hint}" if hint else message) from None
    finally:
        for name in _HELD_LOGGERS:
            logging.getLogger(name).removeFilter(held)
        for record in held.records:
            logging.getLogger(record.name).handle(record)


#: How the client's handshake says to give the secret a node refused: a script's
#: words (dispynb/protocol/handshake.py), and a notebook's.
_SCRIPT_SECRET = "(secret= or secret_file=, DISPYNB_SECRET or DISPYNB_SECRET_FILE)"
_NOTEBOOK_SECRET = (
    "(--secret-file FILE on the %dispy nodes line, or DISPYNB_SECRET_FILE in the "
    "kernel's environment)"
)
#: Said when a node on this machine refused the notebook's secret: likely another
#: notebook's ``%dispy local`` node (its address is in that notebook's output).
SHARE_HINT = (
    "another notebook's %dispy local nodes cannot be shared (their secret is "
    "random, and they stop with their kernel): to share nodes between notebooks, "
    "run dispynb-node --host 127.0.0.1 --secret-file FILE in a terminal, then "
    "%dispy nodes 127.0.0.1 --secret-file FILE in each notebook"
)


def nodes_words(message: str, specs: list[str]) -> str:
    """``message`` (why ``%dispy nodes`` could not use ``specs``) in a notebook's
    words: each node named once, the secret given as the magic takes it, and how to
    share nodes between notebooks when one on this machine refused the secret."""
    from dispynb.protocol.handshake import PROOF_REFUSED
    from dispynb.transport.addressing import is_loopback, parse_address

    for spec in specs:  # 'cannot use H:P: H:P: the client's proof ...'
        message = message.replace(
            f"cannot use {spec}: {spec}: ", f"cannot use {spec}: "
        )
    message = message.replace(_SCRIPT_SECRET, _NOTEBOOK_SECRET)
    refused = PROOF_REFUSED in message
    try:
        here = all(is_loopback(parse_address(spec)[0]) for spec in specs)
    except ConfigurationError:
        here = False
    if refused and here:  # the most likely case first, after the error
        first, _, rest = message.partition("\n")
        message = f"{first}\n{SHARE_HINT}" + (f"\n{rest}" if rest else "")
    return message


#: A node's advice on a module it could not import (nodeserver/loading.py), which
#: a cell gives in its own words when the module is the person's.
_NODE_MODULE_ADVICE = (
    " (is a module it needs missing on the node? install it there, or send it "
    "with depends)"
)

#: Loggers that report unusable nodes, and how those messages start.
_HELD_LOGGERS = ("dispynb.scheduler.driver", "dispynb.backends.nodes")
_NO_NODE = "no node could be used"
_HELD_MESSAGES = ("node %s cannot be used", _NO_NODE)


class _HoldRecords(logging.Filter):
    """Keep the records about unusable nodes aside instead of emitting them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_HELD_MESSAGES):
            return True
        self.records.append(record)
        return False


#: ``%dispy ssh/slurm --adapt MIN:MAX``: (minimum, maximum, idle timeout).
Adapt = tuple[int, int, float]


def adapt_bounds(text: str, args: Any) -> Adapt:
    """``'MIN:MAX'`` (and ``--idle-timeout``) as `Adapt`; UsageError if malformed."""
    low, sep, high = text.partition(":")
    try:
        minimum, maximum = int(low), int(high)
    except ValueError:
        minimum = maximum = -1
    if not sep or minimum < 0 or maximum < max(minimum, 1):
        raise UsageError(
            f"--adapt takes MIN:MAX, two node counts with 0 <= MIN <= MAX and MAX >= 1 "
            f"(such as 0:4), not {text!r}"
        )
    if args.idle_timeout < 0:
        raise UsageError("--idle-timeout must be >= 0 seconds")
    return minimum, maximum, float(args.idle_timeout)


def unquote(text: str) -> str:
    """Strip one pair of matching quotes: IPython's argument splitter keeps them."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def dotted_name(text: str) -> bool:
    """``text`` names a value the way code does: ``simulate``, ``model.predict``."""
    return all(part.isidentifier() for part in text.split("."))


def notebook_function(name: str, namespace: dict[str, Any]) -> Any:
    """The callable ``name`` names in the notebook, None if none: a name of
    ``namespace`` or a builtin (``abs``), or an attribute of one, as a person
    writes it (``model.predict``, ``math.sqrt``). Only attributes are looked up:
    nothing typed on the magic line is evaluated here."""
    if not dotted_name(name):
        return None
    head, *attributes = name.split(".")
    value = namespace.get(head, getattr(builtins, head, None))
    try:
        for attribute in attributes:
            value = getattr(value, attribute, None)
    except Exception:  # a property that raised: no function there either
        return None
    return value if callable(value) else None


def last_function(source: str) -> str | None:
    """Name of the last top-level ``def`` in ``source`` (None if none or invalid)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    names = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    return names[-1] if names else None


def callers_of(source: str, name: str) -> list[str]:
    """The other top-level functions of ``source`` that call ``name`` (a function
    the cell defines last is then likely a helper of the one meant to run)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if node.name == name:
            continue
        if any(
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name)
            and call.func.id == name
            for call in ast.walk(node)
        ):
            found.append(node.name)
    return found


def malformed_node(host: str) -> str:
    """What is wrong with a ``%dispy nodes`` address (``HOST[:PORT]``), or ""."""
    from dispynb.node import parse_node_specs

    try:
        parse_node_specs(host)
    except ConfigurationError as exc:
        return re.sub(r"^nodes\[\d+\]: ", "", str(exc))
    return ""
