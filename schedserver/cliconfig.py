"""``dispynb-scheduler --config FILE``: dispyscheduler's configuration files.

``dispyscheduler.py --save_config FILE`` writes every option to an INI ``[DEFAULT]``
section, under its destination's name (``nodes``, ``hosts``, ``loglevel`` for ``-d``,
``http_server`` for ``--httpd``, ``scheduler_alg``...), the options not given at
dispy's defaults. `config_argv` turns such a file (or one ``dispynb-scheduler
--save_config`` wrote) into command-line arguments: a key at dispy's default is an
option not given (dispy's ``dispy_port = 9700``, ``pulse_interval = 0``...), the others
are given as on the command line, so an option refused there is refused from a file
too, with the same line.
"""

from __future__ import annotations

import argparse

from nodeserver.cliconfig import (
    check_values,
    config_dest,
    config_place,
    key_argv,
    read_config,
)

#: dispyscheduler's config keys whose option here has another destination.
_KEY_ALIASES = {
    "nodes": "node",
    "hosts": "host",
    "ext_hosts": "ext_host",
    "http_server": "httpd",
    "dispy_port": "port",  # -p, as on the command line
}

#: The values dispyscheduler's ``--save_config`` writes for options not given.
_DISPY_DEFAULTS = {
    "dispy_port": "9700",
    "pulse_interval": "0",
    "ping_interval": "0",
    "zombie_interval": "60",
    "msg_timeout": "10",
    "max_file_size": "0",
    "scheduler_alg": "none",
}

#: Values that mean "not given" whatever the key (empty, None, False, []).
_UNSET = {"", "none", "false", "[]"}

#: dispyscheduler's ``scheduler_alg`` values -> the option that chose them.
_ALGORITHMS = {
    "fair_cluster": "--fair_cluster_scheduler",
    "fcfs_cluster": "--early_cluster_scheduler",
}


def config_argv(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """Command-line arguments equivalent to the config file at ``path``.

    Raises `ValueError` naming the key at fault.
    """
    actions = {action.dest: action for action in parser._actions}
    argv: list[str] = []
    for key, text in read_config(path).items():
        if key in ("config", "save_config") or _unset(key, text):
            continue
        if key == "scheduler_alg":
            if text.strip() not in _ALGORITHMS:
                raise ValueError(
                    f"{config_place(path, key)}: scheduler_alg must be one of "
                    f"{', '.join(_ALGORITHMS)}, not {text.strip()!r}"
                )
            argv.append(_ALGORITHMS[text.strip()])
            continue
        dest = config_dest(key, text, _KEY_ALIASES)
        argv += key_argv(parser, actions, dest, text, key, path)
    check_values(parser, argv, path)
    return argv


def _unset(key: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _UNSET:
        return True
    default = _DISPY_DEFAULTS.get(key)
    if default is None:
        return False
    try:
        return float(value) == float(default)
    except ValueError:
        return value == default


__all__ = ["config_argv"]
