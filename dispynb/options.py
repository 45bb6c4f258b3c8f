"""Validation and normalisation of ``JobCluster``'s keyword arguments.

``JobCluster`` keeps dispy's long list of keyword arguments (dispy.md section 3.1)
and turns them into a :class:`ClusterOptions` straight away, so that a mistake is
reported once, at construction, with a message that says how to fix it, and the
rest of the client works with checked, normalised values. The checks of each kind of
option are in `dispynb.codeoptions` (what runs), `dispynb.netoptions` (reaching
the nodes) and `dispynb.limits` (what jobs may use).
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field, fields
from typing import Any

from dispynb.codeoptions import (
    _check_cleanup,
    _check_computation,
    _check_depends,
    _check_dest_path,
    _check_files_dir,
    _check_setup,
)
from dispynb.codeoptions import check_callback as check_callback
from dispynb.defaults import MAX_MESSAGE_SIZE
from dispynb.errors import ConfigurationError
from dispynb.limits import DEFAULT_MAX_OUTPUT as DEFAULT_MAX_OUTPUT
from dispynb.limits import DEFAULT_MAX_PIDS as DEFAULT_MAX_PIDS
from dispynb.limits import MIN_MEM_LIMIT as MIN_MEM_LIMIT
from dispynb.limits import (
    _check_max_attempts,
    _check_max_pids,
    _check_message_size,
    _check_result_types,
    _check_setup_timeout,
)
from dispynb.limits import check_job_timeout as check_job_timeout
from dispynb.limits import check_mem_limit as check_mem_limit
from dispynb.limits import check_size as check_size
from dispynb.netoptions import (
    _check_hosts,
    _check_interval,
    _check_pem_file,
    _check_port,
)
from dispynb.secret import resolve_secret

logger = logging.getLogger(__name__)

#: Deprecated dispy names, and the names that replace them.
_ALIASES: dict[str, str] = {
    "callback": "job_status",
    "ip_addr": "host",
    "ext_ip_addr": "ext_host",
}


@dataclass(kw_only=True)
class ClusterOptions:
    """The checked and normalised options of one ``JobCluster``.

    Build it with :meth:`from_kwargs`, which also accepts dispy's deprecated
    names. Every attribute is validated on construction; the secret is resolved
    (argument, ``secret_file``, then the environment) and never shown by ``repr``.

    Attributes
    ----------
    computation:
        A callable (shipped by value with cloudpickle), or the absolute path of
        a program to run.
    nodes:
        The node specs exactly as given (parsed elsewhere).
    depends:
        A new list of dependencies: files, modules, functions, classes, instances.
    job_status, cluster_status:
        Callbacks ``f(job)`` and ``f(status, node, job)``, or None. As in dispy,
        ``cluster_status`` hears a node's ``AvailInfo`` at each pulse when
        ``pulse_interval`` is given, else every 10 minutes.
    dispy_port:
        The TCP port of the nodes named without one, as ``dispynb-node -p PORT``
        pairs with it (dispy's ``dispynode.py -p P`` and ``dispy_port=P``: the
        client on P, nodes on P + 1). Discovered nodes say their port.
    node_port:
        dispy's keyword up to 4.10: the TCP port of the nodes named without one
        (default: ``dispy_port``, else dispynb-node's port, 9711).
    port:
        dispy's keyword up to 4.10 for the client's port: accepted for dispy
        programs and unused (nodes never connect to the client).
    host, ext_host:
        ``host``: the client address discovery pings are sent from (IPv4 or IPv6),
        or None for every interface. ``ext_host``: accepted for dispy programs and
        unused: dispy nodes connected back to it, dispynb nodes never connect to the
        client, so a client behind NAT needs nothing.
    dest_path:
        Directory for the computation's files, relative to the node's directory.
    loglevel:
        A numeric logging level (or its name), the ``dispynb`` logger's, written
        to stderr until the program adds a handler of its own. Default None:
        dispy's INFO, to stderr, for a program outside a notebook that set up no
        logging (no handler on the root logger, no level on ``dispynb``: a level
        set there is kept, its lines on stderr too), until it does
        (``logging.basicConfig()``), then as it set logging up; a handler it adds
        to ``dispynb`` shows the lines at INFO. Otherwise logging is left as the
        program set it.
    ping_interval, pulse_interval, poll_interval:
        Seconds, within dispy's ranges, or None. With ``ping_interval``, discovery
        pings go out that often, and named nodes that are away (not started yet,
        or lost) are tried again that often for as long as the cluster is open:
        `JobCluster` waits for them, as dispy's, rather than stop when none is up.
    secret:
        The shared secret as bytes, or None.
    keyfile, certfile, cafile:
        Absolute paths of PEM files for TLS, or None.
    setup_timeout:
        Seconds ``setup`` may take on a node before it fails there; None (the
        default) waits for ever (dispy gave up after 10 s).
    recover_file:
        The recovery journal of every job (`recover_jobs` reads it after a crash).
        None, as in dispy: scripts write ``_dispy_<time>_<pid>`` in the current
        directory (0600; computations and nodes only, removed at a clean close) and
        nodes keep what ends after the client is lost; not in notebooks,
        interactive sessions or on a LocalCluster. False: no recovery file.
    files_dir:
        Folder where files sent by jobs (``dispy_send_file``) are saved, at their
        relative path; never outside it. Default: the current directory.
    max_message_size:
        Largest message (bytes) accepted from a node after authentication.
    max_attempts:
        With ``reentrant``: how many attempts of one job may die with their node
        (killed, hung, cut off) before the job ends ``Abandoned`` instead of running
        again elsewhere; default 3. A job that kills whatever runs it (a "poison"
        job) so takes down at most this many nodes. Not a dispy option (dispy
        resubmitted for ever); attempts a stopping node hands back unstarted do
        not count.
    job_timeout:
        Seconds a job may run on a node before the node stops it (KeyboardInterrupt,
        then SIGKILL of its worker after 2 s; a program's process group is killed).
        The job ends ``Terminated``, its exception saying it ran over its time
        limit. ``submit(..., dispy_job_timeout=s)`` sets it for one job. Default
        None: no limit (as in dispy; a job may legitimately run for days).
    mem_limit:
        Address space (bytes, or a string such as ``"512M"`` or ``"2G"``) a job's
        worker may use while the job runs, set as the soft ``RLIMIT_AS`` for that
        job only. Going over it raises ``MemoryError`` inside the job, which then
        ends like any job that raised. ``submit(..., dispy_job_mem_limit=...)`` sets
        it for one job. Default None: no limit. It counts the worker's whole
        address space, including what setup loaded and the libraries it maps.
    max_output_size:
        Characters of ``stdout``, of ``stderr`` and of the traceback
        (``exception``) kept per job (bytes for a program computation's output), or
        a size such as ``"4M"``; what a job writes beyond is dropped and a last
        line says how much. Default 4M (4 MiB); None keeps
        everything (a job printing in a loop can then fill the client's memory)
        up to what the node keeps: a quarter of its ``--max-message-size`` (32 M
        characters with its default 1 GiB).
    max_result_size:
        Bytes a job's pickled result may have (int, or a size such as ``"256M"``).
        A larger result is not sent: the job ends ``Terminated`` with
        ``ResultTooLarge`` in ``job.exception``, naming the size and this option.
        Default None: as large as ``max_message_size`` (and the node's) allows,
        less room for a message's header (the job's output is not counted: what
        does not fit in a message comes in chunks).
    max_pids:
        Tasks (processes and threads, the job's worker included) a job may have at
        once, enforced with a pids cgroup per worker where the node can create
        one (a fork bomb then fails with ``BlockingIOError`` inside the job), else
        by counting the job's processes every 0.5 s (a job over the limit is then
        killed with all its processes and ends ``Terminated``, saying why).
        Default 1024; None for no limit. Whatever the limit, the processes a job
        starts end with it (its process group is killed at timeout, cancel and
        close, and leftovers at the job's end). On dispynb's nodes only: on Dask
        or Ray another value is a `NotSupportedError`, and the default is not
        enforced there.
    fresh_process:
        True runs every job in a new process, forked from the computation's
        process after setup (as dispy does): nothing a job leaves in its globals
        or modules reaches the next job. False (the default) reuses workers, which
        is several times faster for short jobs; setup's globals are visible to
        jobs either way. See the README for the figures. Not on Ray (its jobs
        run in long-lived actors): there True is a `NotSupportedError`.
    result_types:
        None (the default): results are unpickled as they come, like anything from a
        node that holds the secret. A list of ``"module.name"`` or ``"module.*"``
        entries: results and provisional results are unpickled by a restricted
        unpickler that loads only those globals (plus plain values and a few
        harmless standard types such as ``set``, ``datetime`` and ``Decimal``); a
        result that needs anything else ends the job ``Terminated``, naming the global.
        It stops a compromised node from running code on the client through a
        result's pickle, within limits: every allowed class or function can still
        be called with arguments of the node's choosing (allow only data types, not
        whole packages with functions that load files or pickles), and functions
        or classes defined in a notebook (sent by value) cannot come back. Not on
        the Ray engine (`NotSupportedError`): a job runs in the process that returns
        its result there, and Ray unpickles it.
    """

    computation: Callable[..., Any] | str
    nodes: Any = None
    depends: list[Any] = field(default_factory=list)
    job_status: Callable[[Any], Any] | None = None
    cluster_status: Callable[[Any, Any, Any], Any] | None = None
    host: str | list[str] | None = None
    dispy_port: int | None = None
    node_port: int | None = None
    port: int | None = None
    ext_host: str | list[str] | None = None
    ipv4_udp_multicast: bool = False
    dest_path: str | None = None
    loglevel: int | None = None
    setup: Callable[..., Any] | None = None
    cleanup: bool | Callable[..., Any] = True
    ping_interval: float | None = None
    pulse_interval: float | None = None
    poll_interval: float | None = None
    reentrant: bool = False
    max_attempts: int = 3
    secret: bytes | None = field(default=None, repr=False)
    keyfile: str | None = None
    certfile: str | None = None
    cafile: str | None = None
    recover_file: str | bool | None = None
    max_message_size: int = MAX_MESSAGE_SIZE
    files_dir: str | None = None
    setup_timeout: float | None = None
    job_timeout: float | None = None
    mem_limit: int | str | None = None
    max_output_size: int | str | None = DEFAULT_MAX_OUTPUT
    max_result_size: int | str | None = None
    max_pids: int | None = DEFAULT_MAX_PIDS
    fresh_process: bool = False
    result_types: list[str] | None = None
    secret_file: InitVar[str | None] = None

    @classmethod
    def from_kwargs(cls, computation: Any, **kwargs: Any) -> ClusterOptions:
        """Check ``JobCluster(computation, **kwargs)``'s arguments and return them.

        Parameters
        ----------
        computation:
            A callable or a program name or path.
        **kwargs:
            dispy's ``JobCluster`` keyword arguments, plus ``cafile``,
            ``secret_file`` and ``max_message_size``. The deprecated ``callback``,
            ``ip_addr`` and ``ext_ip_addr`` stand for ``job_status``, ``host``
            and ``ext_host``.

        Raises
        ------
        TypeError
            For an unknown keyword argument; close matches are suggested.
        ConfigurationError
            For an invalid value; the message says what is expected.
        """
        cls.check_keywords(kwargs)
        for old, new in _ALIASES.items():
            value = kwargs.pop(old, None)
            if value is None:
                continue
            if kwargs.get(new) is not None:
                raise ConfigurationError(
                    f"both {new!r} and its deprecated alias {old!r} were given: "
                    f"give only {new!r}"
                )
            logger.warning("%r is deprecated: use %r instead", old, new)
            kwargs[new] = value
        return cls(computation=computation, **kwargs)

    @classmethod
    def check_keywords(
        cls, kwargs: dict[str, Any], caller: str = "JobCluster", own: Any = ()
    ) -> None:
        """Raise `TypeError` naming the keywords of ``kwargs`` that are neither
        options nor ``own`` (the caller's parameters), with close matches."""
        accepted = (
            {f.name for f in fields(cls)} | {"secret_file"} | set(_ALIASES) | set(own)
        )
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise TypeError(_unknown_keywords_message(unknown, accepted, caller))

    def __post_init__(self, secret_file: str | None) -> None:
        """Validate and normalise every field."""
        self.computation = _check_computation(self.computation)
        self.depends = _check_depends(self.depends)
        self.job_status = check_callback(self.job_status, "job_status", ["job"])
        self.cluster_status = check_callback(
            self.cluster_status, "cluster_status", ["status", "node", "job"]
        )
        self.host = _check_hosts(self.host, "host")
        self.ext_host = _check_hosts(self.ext_host, "ext_host")
        self.dispy_port = _check_port(self.dispy_port)
        self.node_port = _check_port(self.node_port, "node_port")
        self.port = _check_port(self.port, "port", lowest=0)  # 0: any, in dispy
        self.ipv4_udp_multicast = bool(self.ipv4_udp_multicast)
        self.dest_path = _check_dest_path(self.dest_path)
        self.loglevel = _check_loglevel(self.loglevel)
        self.setup = _check_setup(self.setup)
        self.cleanup = _check_cleanup(self.cleanup)
        self.ping_interval = _check_interval(self.ping_interval, "ping_interval")
        self.pulse_interval = _check_interval(self.pulse_interval, "pulse_interval")
        self.poll_interval = _check_interval(self.poll_interval, "poll_interval")
        self.reentrant = bool(self.reentrant)
        self.max_attempts = _check_max_attempts(self.max_attempts)
        self.keyfile = _check_pem_file(self.keyfile, "keyfile")
        self.certfile = _check_pem_file(self.certfile, "certfile")
        self.cafile = _check_pem_file(self.cafile, "cafile")
        if self.keyfile is not None and self.certfile is None:
            raise ConfigurationError(
                "keyfile was given without certfile: give the certificate too "
                "(certfile alone is enough when it also holds the key)"
            )
        if self.recover_file is not None and not isinstance(self.recover_file, bool):
            self.recover_file = os.fspath(self.recover_file)
        elif self.recover_file is True:
            raise ConfigurationError(
                "recover_file=True: give a file name, None (the default recovery "
                "file of scripts) or False (no recovery file)"
            )
        self.max_message_size = _check_message_size(self.max_message_size)
        self.files_dir = _check_files_dir(self.files_dir)
        self.setup_timeout = _check_setup_timeout(self.setup_timeout)
        self.job_timeout = check_job_timeout(self.job_timeout, "job_timeout")
        self.mem_limit = check_mem_limit(self.mem_limit, "mem_limit")
        self.max_output_size = check_size(self.max_output_size, "max_output_size")
        self.max_result_size = check_size(self.max_result_size, "max_result_size")
        if (
            self.max_result_size is not None
            and self.max_result_size > self.max_message_size
        ):
            raise ConfigurationError(
                f"max_result_size of {self.max_result_size} bytes is over "
                f"max_message_size ({self.max_message_size}): no such result could "
                "arrive; raise max_message_size too, or give a smaller limit"
            )
        self.max_pids = _check_max_pids(self.max_pids)
        self.fresh_process = bool(self.fresh_process)
        self.result_types = _check_result_types(self.result_types)
        self.secret = resolve_secret(self.secret, secret_file)


def _unknown_keywords_message(
    unknown: list[str], accepted: set[str], caller: str = "JobCluster"
) -> str:
    """Name the unknown keywords, with close matches among the accepted ones."""
    parts = []
    for name in unknown:
        part = repr(name)
        matches = difflib.get_close_matches(name, sorted(accepted), n=3)
        if matches:
            *others, last = map(repr, matches)
            choices = f"{', '.join(others)} or {last}" if others else last
            part += f" (did you mean {choices}?)"
        parts.append(part)
    if len(unknown) == 1:
        noun = "an unexpected keyword argument"
    else:
        noun = "unexpected keyword arguments"
    return f"{caller}() got {noun} {', '.join(parts)}"


def _check_loglevel(value: Any) -> int | None:
    """Accept a numeric logging level or a level name such as "debug"."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    names = logging.getLevelNamesMapping()
    if isinstance(value, str) and value.upper() in names:
        return names[value.upper()]
    raise ConfigurationError(
        "loglevel must be a logging level such as logging.INFO, or a level name "
        f"such as 'DEBUG', 'INFO' or 'WARNING'; got {value!r}"
    )
