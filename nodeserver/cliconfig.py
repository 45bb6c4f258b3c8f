"""dispynode's option spellings, refusals and INI config files for ``dispynb-node``.

`Refuse` stops at once with one line saying why dispynb does not support an option and
what to use instead. `config_argv` turns a ``--config`` file (dispynode's format: an
INI ``[DEFAULT]`` section, option names as keys) into command-line arguments; lists such
as ``hosts = ['10.0.0.5']`` are read with `ast.literal_eval`, never ``eval``.
`save_config` writes the options given (never a secret) to such a file.
`read_config`, `key_argv` and `save_config` serve ``dispynb-scheduler`` too
(`schedserver.cliconfig`), and so does `CommandParser`, which says how to give an
option a value beginning with ``-``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import gettext
import io
import os
import re
import stat
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from dispynb.daemon import replace_file, to_journal
from dispynb.errors import ConfigurationError
from dispynb.secret import foreign_owner

#: dispynode option -> why dispynb refuses it and what to use instead.
REFUSED: dict[str, tuple[int, str]] = {
    "--init": (
        1,
        "node-wide init() globals are not supported (computations never share the "
        "node server's process): give JobCluster a setup function, or depends=",
    ),
    "--admin_secret": (
        1,
        "there is no dispyadmin: manage nodes from the client (set_node_cpus, "
        "close_node) or its web monitor (DispyHTTPServer)",
    ),
    "--unsafe_setup": (
        0,
        "setup always runs in the computation's own process, never in the node "
        "server (that is the safe behaviour); leave it out",
    ),
    "--dispy_port": (
        1,
        "dispynb nodes do not use dispy's ports 9700/9701 (so both can run on one "
        "machine): use --port for the TCP port and --discovery-port for UDP discovery",
    ),
}

#: dispynode ``--config`` keys whose name differs from the destination here.
_KEY_ALIASES = {
    "ext_hosts": "ext_host",
    "dest_path_prefix": "dest_path",
    "ipv4_udp_multicast": "ipv4_multicast",
    "node_port": "port",
    "ip_addr": "hosts",
    "scheduler_node": "scheduler_host",  # dispynode's name for it before 4.11
}

#: dispynode ``--config`` keys (its options' destinations) of refused options whose
#: name differs from the option's.
_REFUSED_KEYS = {"node_init": "--init"}

#: Keys a dispynode config file holds at their defaults (meaning: not used).
_UNSET = {"", "none", "false", "[]", "0", "-1"}

#: Destinations never written by ``--save_config``.
_NOT_SAVED = {"config", "save_config", "secret", "help", "version"}


class CommandParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` that says how to give an option a value beginning
    with ``-`` (a secret may): argparse takes ``--secret -xyz`` for two options and
    said only "expected one argument". It exits on errors as argparse does."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(exit_on_error=False, **kwargs)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        """Exit as argparse does; under systemd, the error's lines at the journal's
        error priority (``<3>``), as `dispynb.daemon.run_daemon` writes the others:
        a bad option or --config file was filed as information, and
        ``journalctl -p err`` did not show why the service failed."""
        if status and message and to_journal():
            message = "".join(f"<3>{line}" for line in message.splitlines(True))
        super().exit(status, message)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        words = sys.argv[1:] if args is None else list(args)
        try:
            return super().parse_known_args(words, namespace)
        except argparse.ArgumentError as exc:
            self.error(f"{exc}{self._dash_value_hint(exc, words)}")

    def _dash_value_hint(self, exc: argparse.ArgumentError, words: list[str]) -> str:
        # argparse's own words for a missing value (gettext: as argparse says them)
        if exc.message != gettext.gettext("expected one argument"):
            return ""
        for action in self._actions:
            names = action.option_strings
            if "/".join(names) != exc.argument_name:
                continue
            given = [i for i, word in enumerate(words[:-1]) if _names(word, names)]
            if any(words[i + 1].startswith("-") for i in given):
                return (
                    f" (a value beginning with '-' goes after '=': "
                    f"{_long_option(action)}=VALUE)"
                )
        return ""


def _names(word: str, names: Sequence[str]) -> bool:
    """Whether ``word`` is one of the option strings ``names``, or a long one cut
    short (argparse takes ``--sec`` for ``--secret``)."""
    if word in names:
        return True
    return (
        len(word) > 2
        and word.startswith("--")
        and any(name.startswith(word) for name in names)
    )


class Refuse(argparse.Action):
    """An option of dispynode that dispynb does not support: exit 2 with one line."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        name = option_string or self.dest
        parser.exit(2, f"dispynb-node: {name} is not supported: {self.help}\n")


def add_refused(parser: argparse.ArgumentParser) -> None:
    """Add dispynode's unsupported options, each refused with its reason."""
    for option, (nargs, why) in REFUSED.items():
        parser.add_argument(
            option,
            action=Refuse,
            nargs=nargs,
            help=why,
            metavar="X" if nargs else None,
        )


def config_argv(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """Command-line arguments equivalent to the config file at ``path``.

    Raises `ValueError` with the key at fault.
    """
    actions = {action.dest: action for action in parser._actions}
    argv: list[str] = []
    for key, text in read_config(path).items():
        if key in ("config", "save_config"):
            continue
        if key == "safe_setup":  # dispynode's --unsafe_setup stores safe_setup=False
            if text.strip().lower() in ("false", "0", "no", "off"):
                argv.append("--unsafe_setup")
            continue
        refused = _REFUSED_KEYS.get(key, f"--{key}")
        if refused in REFUSED:
            if text.strip().lower() not in _UNSET and key != "dispy_port":
                argv += [refused] + ([text] if REFUSED[refused][0] else [])
            continue
        dest = config_dest(key, text, _KEY_ALIASES)
        argv += key_argv(parser, actions, dest, text, key, path)
    check_values(parser, argv, path)
    return argv


def key_argv(
    parser: argparse.ArgumentParser,
    actions: dict[str, argparse.Action],
    dest: str,
    text: str,
    key: str,
    path: str,
) -> list[str]:
    """`option_argv`, its value checked (`check_values`): an error names the line."""
    words = option_argv(actions, dest, text, key, path)
    check_values(parser, words, path, key)
    return words


def check_values(
    parser: argparse.ArgumentParser, argv: list[str], path: str, key: str = ""
) -> None:
    """Raise `ValueError` naming the config file ``path`` (and the line of ``key``,
    if given) for a value of it that its option refuses (``cpus = x``): argparse
    said it of the command line, as 'argument -c/--cpus: invalid int value', after
    a usage the admin did not type."""
    try:
        # argparse's own parse (CommandParser's exits), raising with exit_on_error
        # False: the file's arguments alone, as they will be parsed.
        argparse.ArgumentParser.parse_known_args(parser, argv)
    except argparse.ArgumentError as exc:
        raise ValueError(f"{config_place(path, key)}: {exc}") from None


def config_place(path: str, key: str = "") -> str:
    """``config file 'PATH', line N`` where ``key`` is set in the file at ``path``
    (its name alone without a ``key``, or if the line is not found): an admin goes
    to the line, not through the file for the key."""
    place = f"config file {path!r}"
    if not key:
        return place
    setting = re.compile(rf"\s*{re.escape(key)}\s*[=:]", re.IGNORECASE)
    with (
        contextlib.suppress(OSError, UnicodeDecodeError),
        open(path, encoding="utf-8") as handle,
    ):
        for number, line in enumerate(handle, 1):
            if setting.match(line):
                return f"{place}, line {number}"
    return place


def config_dest(key: str, text: str, aliases: dict[str, str]) -> str:
    """The destination of config ``key`` (value ``text``): ``aliases``' or its own.

    ``loglevel`` is two things: dispynode and dispyscheduler store their ``-d`` as
    ``loglevel = True``/``False``; dispynb's ``--save_config`` writes ``--loglevel``
    as ``loglevel = warning`` (read as ``-d``, it was ignored).
    """
    if key == "loglevel":
        value = text.strip().lower()
        return "debug" if value in ("true", "false", "1", "0", "yes", "no") else key
    return aliases.get(key, key.replace("-", "_"))


def read_config(path: str) -> dict[str, str]:
    """The ``[DEFAULT]`` section of the INI file at ``path`` (dispy's config files),
    its keys stripped. Raises `ValueError` if it cannot be read, or if another user
    could change it (`_refuse_others`)."""
    import configparser  # here: a node without --config never needs it (0.2 MiB)

    reader = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            _refuse_others(path, os.fstat(handle.fileno()))  # the file read
            reader.read_file(handle)
    except configparser.MissingSectionHeaderError:
        raise ValueError(
            f"config file {path!r} has no section header: put a line [DEFAULT] "
            f"before its options ({_SAVED})"
        ) from None
    except (OSError, configparser.Error) as exc:
        raise ValueError(f"cannot read config file {path!r}: {exc}") from None
    if reader.sections():
        # dispy's programs read [DEFAULT] only, ignoring any other section without a
        # word: options there would be lost on an admin who meant them.
        named = ", ".join(f"[{name}]" for name in reader.sections())
        raise ValueError(
            f"config file {path!r} has options under {named}, which would be "
            f"ignored: only [DEFAULT] is read ({_SAVED}): move them under [DEFAULT]"
        )
    return {key.strip(): text for key, text in reader.defaults().items()}


#: How `read_config` says where options go.
_SAVED = "as in dispy's config files and those --save_config writes"


def _refuse_others(path: str, info: os.stat_result) -> None:
    """Raise `ValueError` if a user other than this one (or root) owns the config
    file, or may write to it: they would choose the program's options (its secret,
    the directories it writes, the nodes it trusts), and a node run as root then
    ran their code."""
    foreign = foreign_owner(info)
    if foreign:
        raise ValueError(
            f"config file {path!r} belongs to {foreign}, who could change this "
            "program's options (its secret, the directories it writes): give a "
            "file of your own"
        )
    if os.name == "posix" and info.st_mode & 0o022:
        raise ValueError(
            f"config file {path!r} is writable by other users (mode "
            f"{stat.S_IMODE(info.st_mode):04o}), who could change this program's "
            f"options (its secret, the directories it writes): chmod go-w {path}"
        )


def refuse_readable_secret(path: str, key: str) -> None:
    """Raise `ConfigurationError` if the config file at ``path``, which holds a
    secret under ``key``, may be read by users other than its owner.

    dispynode saves its ``--secret`` in its config file, whatever the file's mode; a
    node with that file readable by others runs code for whoever reads it. Such a
    file is refused as a ``--secret-file`` of the same mode is."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # it was read just now; what it held is what counts
    if os.name == "posix" and mode & 0o077:
        raise ConfigurationError(
            f"config file {path!r} holds the secret ({key} = ...) and other users "
            f"can read it (mode {stat.S_IMODE(mode):04o}): run chmod 600 {path}, or "
            "move the secret to a file of mode 600 (--secret-file)"
        )


def option_argv(
    actions: dict[str, argparse.Action], dest: str, text: str, key: str, path: str
) -> list[str]:
    """The command-line words giving the option of destination ``dest`` the value
    ``text`` (read for ``key`` in the config file ``path``): a flag if true, each
    item of a list, or the value. Raises `ValueError` if no option has ``dest``."""
    action = actions.get(dest)
    if action is None or not action.option_strings:
        raise ValueError(f"{config_place(path, key)}: unknown option {key!r}")
    option = _long_option(action)
    value = text.strip()
    if action.nargs == 0:  # a flag
        if isinstance(action, argparse.BooleanOptionalAction):
            if value.lower() in ("none", ""):
                return []
            return [option if _truth(value) else f"--no-{option[2:]}"]
        return [option] if _truth(value) else []
    if value.lower() in ("none", ""):
        return []
    if isinstance(action, argparse._AppendAction):
        items = _literal_list(value, key, path)
        return [f"{option}={item}" for item in items]
    return [f"{option}={value}"]  # one word: a value may begin with '-' (a secret)


def _truth(value: str) -> bool:
    return value.lower() in ("1", "true", "yes", "on")


def _literal_list(value: str, key: str, path: str) -> list[Any]:
    if _PLAIN.fullmatch(value):
        return [value]  # one address or name
    try:
        items = ast.literal_eval(value)
        if not isinstance(items, (list, tuple)):
            raise ValueError(value)
    except (ValueError, SyntaxError):
        raise ValueError(
            f"{config_place(path, key)}: {key} must be a list of strings, not {value!r}"
        ) from None
    return [str(item) for item in items if item not in (None, "")]


#: One address or host name, written without brackets or quotes.
_PLAIN = re.compile(r"[\w.:%*-]+")


def _long_option(action: argparse.Action) -> str:
    longs = [o for o in action.option_strings if o.startswith("--")]
    return longs[0] if longs else action.option_strings[0]


def save_config_and_exit(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    secret_note: str,
    not_saved: frozenset[str] = frozenset(),
) -> NoReturn:
    """``--save_config``: write the options given (`save_config`), say where (or, to
    standard output, nothing but what was left out: ``secret_note``), and exit 0;
    exit 2 saying why if it cannot be written (the file, if any, left as it was)."""
    try:
        left_out = save_config(parser, args, args.save_config, not_saved)
    except OSError as exc:  # the message names the temporary file: not shown
        parser.exit(
            2,
            f"{parser.prog}: cannot save the configuration to {args.save_config!r}: "
            f"{exc.strerror or exc}; give a file in a directory that exists, you "
            "can write to and has room (or - for standard output)\n",
        )
    note = f" ({secret_note})"
    if args.save_config == "-":  # the configuration is standard output
        if left_out:
            print(f"{parser.prog}: saved{note}", file=sys.stderr)
    else:
        print(f"saved to {args.save_config}{note if left_out else ''}")
    raise SystemExit(0)


def save_config(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    path: str,
    not_saved: frozenset[str] = frozenset(),
) -> list[str]:
    """Write the options that differ from their defaults to ``path`` (mode 600;
    ``'-'``: standard output), as an INI ``[DEFAULT]`` section keyed by their
    destinations, under a comment naming the program (``parser.prog``).

    Secrets are never written (``secret`` and the destinations in ``not_saved``);
    returns the names of those left out that were given.
    """
    import configparser  # as in `read_config`

    writer = configparser.ConfigParser(interpolation=None)
    left_out = []
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or isinstance(action, Refuse):
            continue
        value = getattr(args, dest, None)
        if dest in _NOT_SAVED or dest in not_saved:
            if (dest == "secret" or dest in not_saved) and value:
                left_out.append(dest)
            continue
        if value is None or value == action.default:
            continue
        if action.metavar in _PATHS:
            # Read back by a service in another working directory (systemd's is /).
            value = _absolute(value)
        writer["DEFAULT"][dest] = _to_text(value)
    header = f"# {parser.prog} options ({parser.prog} --config FILE)\n"
    if path == "-":
        sys.stdout.write(header)
        writer.write(sys.stdout)
        sys.stdout.flush()
        return left_out
    text = io.StringIO(header)
    text.seek(0, io.SEEK_END)
    writer.write(text)
    # A new file, renamed over the old one: writing into the old one kept its mode
    # (open to others, say) and went through a symlink planted in its place.
    replace_file(path, text.getvalue(), 0o600)
    return left_out


#: The metavars of options whose values are paths (saved absolute).
_PATHS = {"FILE", "DIR"}


def _absolute(value: Any) -> Any:
    """``value`` (a path, or a list of them) made absolute; ``-`` stays."""
    if isinstance(value, list):
        return [_absolute(item) for item in value]
    if isinstance(value, str) and value and value != "-":
        return os.path.abspath(value)
    return value


def _to_text(value: Any) -> str:
    if isinstance(value, list):
        return repr([str(item) for item in value])
    if isinstance(value, datetime.time):
        return value.strftime("%H:%M")
    return str(value)
