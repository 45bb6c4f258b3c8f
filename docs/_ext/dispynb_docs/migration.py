"""The dispy migration guide's tables: dispy's names (`dispy_names`), each with its
dispynb status computed from the code, so the guide follows the code.

Statuses: "same" (dispynb has it and behaves as dispy), "different" (it has it, and
the note says how it differs; for node options, also the refusal or warning the
node gives), "not supported" (it does not have it; the note says why and what to do).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import inspect
import io
import logging
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from types import SimpleNamespace
from typing import Any

from dispynb_docs import dispy_names as names
from dispynb_docs.dispy_names import Name

SAME = "same"
DIFFERENT = "different"
NOT_SUPPORTED = "not supported"


@dataclass(frozen=True)
class Row:
    """One row of a migration table."""

    name: str
    status: str
    note: str  # reStructuredText, written in dispy_names
    detail: str = ""  # plain text from the code: a help text, or a refusal
    refused: bool = False  # the detail is the program's refusal
    option: str = ""  # the program's option it is (as the CLI reference names it)
    meaning: str = ""  # what it does in dispy (reStructuredText)
    program: str = "dispynb-node"  # whose option (and help, or refusal) it is


def _row(entry: Name, present: bool, detail: str = "") -> Row:
    if not present:
        status, note = NOT_SUPPORTED, entry.missing or "Not in dispynb."
    elif entry.differs:
        status, note = DIFFERENT, entry.differs
    else:
        status, note = SAME, entry.note
    return Row(entry.name, status, note, detail, meaning=entry.meaning)


# -- what the code has -----------------------------------------------------------------


def _dispynb() -> Any:
    return importlib.import_module("dispynb")


def module_rows() -> list[Row]:
    dispynb = _dispynb()
    return [_row(e, hasattr(dispynb, e.name)) for e in names.MODULE]


def accepted_keywords(cls: Any) -> set[str]:
    """The keyword arguments ``cls(...)`` accepts: its signature's names, and for
    ``**options`` what `dispynb.options.ClusterOptions.from_kwargs` accepts."""
    params = inspect.signature(cls).parameters
    accepted = {
        name
        for name, p in params.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        options = importlib.import_module("dispynb.options").ClusterOptions
        for candidate in _all_dispy_keywords() - accepted:
            if _options_accept(options, candidate):
                accepted.add(candidate)
    return accepted


def _all_dispy_keywords() -> set[str]:
    return {e.name for e in names.JOBCLUSTER + names.SHARED}


def _options_accept(options: Any, keyword: str) -> bool:
    """Whether ``ClusterOptions.from_kwargs(abs, keyword=None)`` knows the keyword
    (a `TypeError` is its answer for unknown keywords; a bad value still means
    the keyword is known)."""
    with _quiet_logs():
        try:
            options.from_kwargs(abs, **{keyword: None})
        except TypeError:
            return False
        except Exception:
            return True
    return True


def jobcluster_rows() -> list[Row]:
    accepted = accepted_keywords(_dispynb().JobCluster)
    return [_row(e, e.name in accepted) for e in names.JOBCLUSTER]


def shared_rows() -> list[Row]:
    accepted = accepted_keywords(_dispynb().SharedJobCluster)
    return [_row(e, e.name in accepted) for e in names.SHARED]


def method_rows() -> list[Row]:
    cls = _dispynb().JobCluster
    init = inspect.getsource(cls.__init__)
    return [
        _row(
            e,
            f"self.{e.name} =" in init
            if e.extra.get("instance")
            else _defined(cls, e.name),
        )
        for e in names.METHODS
    ]


def _defined(cls: Any, name: str) -> bool:
    """Whether ``cls`` defines ``name`` itself (not just `object`'s default)."""
    return any(name in vars(klass) for klass in cls.__mro__ if klass is not object)


def submit_keyword_rows() -> list[Row]:
    """A reserved keyword is supported where ``submit`` reads it: in the module of
    ``JobCluster`` or of one of its parts (``_Jobs`` in ``_clusterjobs``...)."""
    source = "".join(
        inspect.getsource(importlib.import_module(klass.__module__))
        for klass in _dispynb().JobCluster.__mro__
        if klass.__module__.startswith("dispynb")
    )
    return [_row(e, f'"{e.name}"' in source) for e in names.SUBMIT_KEYWORDS]


def job_rows() -> list[Row]:
    cls = _dispynb().DispyJob
    job = cls(None, (), {})
    rows = []
    for entry in names.JOB:
        present = (
            _defined(cls, entry.name)
            if entry.name.startswith("__")
            else hasattr(job, entry.name)
        )
        rows.append(_row(entry, present))
    return rows


def status_rows() -> list[Row]:
    dispynb = _dispynb()
    rows = []
    for entry in names.STATUSES:
        owner, attr = entry.name.split(".")
        value = getattr(getattr(dispynb, owner), attr, None)
        if value is None:
            rows.append(_row(entry, False))
        elif int(value) != entry.value:
            rows.append(
                Row(entry.name, DIFFERENT, f"dispy: {entry.value}, dispynb: {value}")
            )
        else:
            rows.append(Row(entry.name, SAME, f"``{entry.value}`` in both."))
    return rows


def node_rows() -> list[Row]:
    node = _dispynb().DispyNode("127.0.0.1", 9711, "n", 1)
    return [_row(e, hasattr(node, e.name)) for e in names.NODE]


def avail_info_rows() -> list[Row]:
    params = inspect.signature(_dispynb().DispyNodeAvailInfo).parameters
    return [_row(e, e.name in params) for e in names.AVAIL_INFO]


def node_allocate_rows() -> list[Row]:
    cls = _dispynb().NodeAllocate
    params = inspect.signature(cls).parameters
    allocate = inspect.signature(cls.allocate).parameters
    return [_row(e, e.name in params) for e in names.NODE_ALLOCATE] + [
        _row(e, e.name in allocate) for e in names.ALLOCATE
    ]


def job_global_rows() -> list[Row]:
    """What a computation finds in its globals: the names the node injects."""
    compute = importlib.import_module("nodeserver.compute")
    load = SimpleNamespace(
        node_name="n", node_address="127.0.0.1", job_path=".", node_debug=False
    )
    injected = set(compute.dispy_names(load, modules=False))
    return [_row(e, e.name in injected) for e in names.JOB_GLOBALS]


def implicit_module_rows() -> list[Row]:
    modules = set(importlib.import_module("dispynb.jobenv").DISPY_MODULES)
    return [_row(e, e.name in modules) for e in names.IMPLICIT_MODULES]


def httpd_rows() -> list[Row]:
    server = importlib.import_module("dispynb.httpd").DispyHTTPServer
    params = inspect.signature(server).parameters
    return [_row(e, e.name in params) for e in names.HTTPD] + [
        _row(e, _defined(server, e.name)) for e in names.HTTPD_METHODS
    ]


def program_rows() -> list[Row]:
    scripts = {
        ep.name
        for ep in metadata.entry_points(group="console_scripts")
        if ep.value.split(".")[0] in ("dispynb", "nodeserver", "schedserver")
    }
    rows = []
    for entry in names.PROGRAMS:
        script, _, command = entry.alias_of.partition(" ")
        present = bool(script) and script in scripts
        if present and command:  # a command of the ``dispynb`` script
            present = command in _dispynb_commands()
        row = _row(entry, present)
        if present:
            row = Row(row.name, row.status, f"``{entry.alias_of}``. {row.note}")
        rows.append(row)
    return rows


def _dispynb_commands() -> set[str]:
    """The commands of the ``dispynb`` script (``dispynb run``...)."""
    parser = importlib.import_module("dispynb.cli").build_parser()
    commands = next(
        action
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    return set(commands.choices)


# -- dispynode's and dispyscheduler's options: asked of dispynb's own parsers ----------


#: A strong secret (256 random bits) for the options that need one.
_SECRET = secrets.token_urlsafe(32)


def node_option_rows() -> list[Row]:
    """For each dispynode option: does ``dispynb-node`` accept it, and with what
    effect? The option is given to the real parser (and `config_from_args`)."""
    return _option_rows("nodeserver.cli", names.NODE_OPTIONS)


def scheduler_option_rows() -> list[Row]:
    """For each dispyscheduler option: does ``dispynb-scheduler`` accept it, and
    with what effect? Given with a users file, as a scheduler needs one."""
    return _option_rows(
        "schedserver.cli", names.SCHEDULER_OPTIONS, ("--users", "{dir}/users")
    )


def _option_rows(
    module: str, entries: list[Name], needed: tuple[str, ...] = ()
) -> list[Row]:
    """Each of ``entries`` given (its sample, after ``needed``) to the parser and
    `config_from_args` of the program ``module`` makes."""
    cli = importlib.import_module(module)
    parser: argparse.ArgumentParser = cli.build_parser()
    known = parser._option_string_actions
    with tempfile.TemporaryDirectory(prefix="dispynb-docs-") as tmp:
        for filename in ("node.ini", "sched.ini", "init.py"):
            open(os.path.join(tmp, filename), "w").close()
        _self_signed(tmp)
        rows = []
        for entry in entries:
            action = known.get(entry.name)
            if action is None:
                rows.append(_row(entry, False))
                continue
            args = [
                arg.replace("{dir}", tmp).replace("{secret}", _SECRET)
                for arg in (*needed, *entry.sample)
            ]
            problem, warnings = _try_options(cli, parser, args)
            option = next(
                (s for s in action.option_strings if s.startswith("--")), entry.name
            )
            if problem:
                problem = problem.removeprefix(f"{parser.prog}: ")
                rows.append(
                    Row(
                        entry.name,
                        NOT_SUPPORTED,
                        entry.missing,
                        problem,
                        refused=True,
                        option=option,
                        meaning=entry.meaning,
                        program=parser.prog,
                    )
                )
                continue
            row = _row(entry, True, _help(parser, action))
            if warnings:
                row = dataclasses.replace(
                    row, status=DIFFERENT, detail=f"{row.detail} Warns: {warnings}"
                )
            rows.append(dataclasses.replace(row, option=option, program=parser.prog))
    return rows


def _self_signed(directory: str) -> None:
    """A throwaway certificate (``cert.pem``) and key (``key.pem``) in
    ``directory``, for the samples of options that load them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "sample")])
    now = datetime.datetime.now(datetime.UTC)
    builder = x509.CertificateBuilder(
        issuer_name=name,
        subject_name=name,
        public_key=key.public_key(),
        serial_number=x509.random_serial_number(),
        not_valid_before=now,
        not_valid_after=now + datetime.timedelta(days=1),
    )
    cert = builder.sign(key, hashes.SHA256())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The certificate file holds its key too, as dispy's could: given alone, it works.
    both = cert.public_bytes(serialization.Encoding.PEM) + pem
    for filename, data in (("cert.pem", both), ("key.pem", pem)):
        fd = os.open(os.path.join(directory, filename), os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """dispynb-node's help for the option (plain text)."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    return str(parser._get_formatter()._expand_help(action))


def _try_options(
    cli: Any, parser: argparse.ArgumentParser, args: list[str]
) -> tuple[str, str]:
    """Parse ``args`` as dispynb-node would; return (refusal, warnings logged).

    A secret is in the environment (``DISPYNB_SECRET``), as on a real node, so that
    only the option's own effect shows."""
    err = io.StringIO()
    with (
        _quiet_logs() as records,
        contextlib.redirect_stderr(err),
        _environment(DISPYNB_SECRET=_SECRET, DISPYNB_SECRET_FILE=None),
    ):
        try:
            parsed = parser.parse_args(args)
        except SystemExit:
            return _last_line(err.getvalue()) or "refused", ""
        make_config: Callable[..., Any] | None = getattr(cli, "config_from_args", None)
        if make_config is not None:
            try:
                make_config(parsed)
            except SystemExit:
                return _last_line(err.getvalue()) or "refused", ""
            except Exception as exc:  # the node's own refusal, shown as is
                if type(exc).__name__ in ("FileNotFoundError", "OSError"):
                    pass  # the sample names no real certificate: not a refusal
                else:
                    return str(exc), ""
    warned = "; ".join(r.getMessage() for r in records if r.levelno >= logging.WARNING)
    return "", warned


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    # argparse: "dispynb-node: error: ..." -> the message
    return line.split("error: ", 1)[-1]


@contextlib.contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _quiet_logs() -> Iterator[list[logging.LogRecord]]:
    """Collect log records instead of printing them (the build treats its own
    warnings as errors; these are the code's answers, shown in the guide)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = logging.getLogger()
    handler = Collect(logging.DEBUG)
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


#: Each table of the guide: its key (used by the directive), title and rows.
TABLES: dict[str, tuple[str, Callable[[], list[Row]]]] = {
    "programs": ("Programs", program_rows),
    "module": ("Module names (``dispy.X``)", module_rows),
    "jobcluster": ("``JobCluster`` parameters", jobcluster_rows),
    "shared": ("``SharedJobCluster``'s own parameters", shared_rows),
    "methods": ("Cluster methods", method_rows),
    "submit": ("``submit`` keywords", submit_keyword_rows),
    "job": ("``DispyJob`` attributes", job_rows),
    "statuses": ("Status numbers", status_rows),
    "node": ("``DispyNode`` attributes", node_rows),
    "availinfo": ("``DispyNodeAvailInfo`` attributes", avail_info_rows),
    "nodeallocate": (
        "``NodeAllocate`` and ``allocate`` parameters",
        node_allocate_rows,
    ),
    "globals": ("Names in a computation's globals", job_global_rows),
    "modules": (
        "Modules a computation may use without importing",
        implicit_module_rows,
    ),
    "dispynode": ("``dispynode.py`` options", node_option_rows),
    "dispyscheduler": ("``dispyscheduler.py`` options", scheduler_option_rows),
    "httpd": ("``DispyHTTPServer``", httpd_rows),
}


def all_names() -> dict[str, list[str]]:
    """Every dispy name of the data, by table (what the guide must cover)."""
    return {
        "programs": [e.name for e in names.PROGRAMS],
        "module": [e.name for e in names.MODULE],
        "jobcluster": [e.name for e in names.JOBCLUSTER],
        "shared": [e.name for e in names.SHARED],
        "methods": [e.name for e in names.METHODS],
        "submit": [e.name for e in names.SUBMIT_KEYWORDS],
        "job": [e.name for e in names.JOB],
        "statuses": [e.name for e in names.STATUSES],
        "node": [e.name for e in names.NODE],
        "availinfo": [e.name for e in names.AVAIL_INFO],
        "nodeallocate": [e.name for e in names.NODE_ALLOCATE + names.ALLOCATE],
        "globals": [e.name for e in names.JOB_GLOBALS],
        "modules": [e.name for e in names.IMPLICIT_MODULES],
        "dispynode": [e.name for e in names.NODE_OPTIONS],
        "dispyscheduler": [e.name for e in names.SCHEDULER_OPTIONS],
        "httpd": [e.name for e in names.HTTPD + names.HTTPD_METHODS],
    }


# -- what dispynb adds -----------------------------------------------------------------


def added_keywords() -> list[str]:
    """``JobCluster`` keywords dispynb accepts that dispy's ``JobCluster`` did not."""
    options = importlib.import_module("dispynb.options").ClusterOptions
    candidates = set(accepted_keywords(_dispynb().JobCluster))
    candidates |= {f for f in options.__dataclass_fields__ if not f.startswith("_")}
    candidates.add("secret_file")
    dispy = {e.name for e in names.JOBCLUSTER + names.SHARED}
    return sorted(k for k in candidates - dispy if _options_accept(options, k))


def added_node_options() -> list[str]:
    """``dispynb-node`` options that ``dispynode.py`` did not have (long forms)."""
    return _added_options("nodeserver.cli", names.NODE_OPTIONS)


def added_scheduler_options() -> list[str]:
    """``dispynb-scheduler`` options that ``dispyscheduler.py`` did not have."""
    return _added_options("schedserver.cli", names.SCHEDULER_OPTIONS)


def _added_options(module: str, entries: list[Name]) -> list[str]:
    parser = importlib.import_module(module).build_parser()
    dispy = {e.name for e in entries}
    added = []
    for action in parser._actions:
        strings = action.option_strings
        if not strings or set(strings) & dispy or "--help" in strings:
            continue
        if "; refused:" in (action.help or ""):
            continue  # an older dispy version's option, refused: not dispynb's own
        added.append(max(strings, key=len))
    return added
