"""dispy's user-visible names, written down once: the migration guide's rows.

Taken from dispy 4.15 (its ``py3`` sources and documentation, summarised in the
team's dispy reference): module names, ``JobCluster`` and ``SharedJobCluster``
parameters, cluster methods, ``DispyJob``/``DispyNode`` attributes, status numbers,
names a computation finds in its globals, ``dispynode.py`` and ``dispyscheduler.py``
options, the web monitor and the programs. Only the names (and dispy's numbers) are
data here; whether dispynb has each one is computed from the code by
`dispynb_docs.migration`.

``differs`` says how dispynb's version differs when dispynb has the name; ``missing``
says why dispynb does not have it (and what to do instead) when it does not. A name
dispynb has and whose ``differs`` is empty is reported "same" (with its ``note``, if
any).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dispynb.defaults import NODE_PORT, SCHEDULER_REGISTER_PORT
from dispynb.jobenv import DISPY_MODULES


@dataclass(frozen=True)
class Name:
    """One dispy name and what the guide says about it."""

    name: str
    differs: str = ""
    missing: str = ""
    #: Said when dispynb has the name and behaves as dispy.
    note: str = ""
    #: What it does in dispy, where the name alone does not say.
    meaning: str = ""
    #: dispy's value, for the status numbers.
    value: int | None = None
    #: For ``dispynode.py`` options: the arguments that exercise it (``{dir}``: a
    #: temporary folder, ``{secret}``: a strong secret).
    sample: tuple[str, ...] = ()
    #: Also accepted by dispynb under this name (checked too).
    alias_of: str = ""
    extra: dict[str, str] = field(default_factory=dict)


#: ``dispy.<name>``: the module's names (``__all__`` and de-facto public ones).
MODULE = [
    Name(
        "JobCluster",
        differs="Functions travel by value (cloudpickle), not as "
        "source text, so closures, lambdas, notebook classes and methods work.",
    ),
    Name(
        "SharedJobCluster",
        differs="``scheduler_host=`` names a ``dispynb-scheduler``, which shares its "
        "nodes between users, each proving a credential of their own "
        "(``secret_file=``); without it, a ``JobCluster`` on the nodes given "
        "(``nodes=``): dispynb's node servers serve several clients at once.",
    ),
    Name("DispyJob", differs="Also awaitable (``await job``) in asyncio code."),
    Name("DispyNode"),
    Name(
        "NodeAllocate",
        differs="Given to a ``SharedJobCluster`` through a ``dispynb-scheduler``, "
        "``allocate()`` (a subclass's too) is asked about each node behind the "
        "scheduler, in the client's process, and its answer applies to that "
        "cluster alone: 0 closes it there, fewer CPUs limit its jobs there (dispy "
        "sent the scheduler only each one's host, port, cpus, depends and "
        "setup_args: a subclass's ``allocate()`` never ran). Every node is set up "
        "with the first one's ``setup_args`` and ``depends`` (logged if they "
        "differ).",
    ),
    Name("DispyNodeAvailInfo"),
    Name(
        "logger",
        differs="A standard `logging` logger named ``dispynb``. Its lines go to "
        "stderr (dispy's, pycos's own logger, wrote ``DATE TIME dispy - message`` "
        "to stdout), or where the program's logging set-up sends them.",
    ),
    Name(
        "recover_jobs",
        differs="Works (dispy 4.15's raised ``KeyError``); with no argument it opens "
        "the newest default recovery file, as dispy's. The journal holds no secret: "
        "give it again (or have it in the environment). It returns every job of "
        "the journal, those still running at ``timeout`` ``Running``, with their "
        "``start_time`` and node (dispy's left them out; ``timeout`` bounds the "
        "whole call, over all nodes, as dispy's). Given another user's credential, "
        "a shared scheduler's jobs come back ``Abandoned`` saying so, and stay in "
        "the journal for that user's recovery. "
        "With ``terminate_pending`` the jobs still running at ``timeout`` are "
        "terminated on their nodes, as dispy's, and returned ``Terminated``.",
    ),
    Name(
        "httpd",
        differs="``dispynb.httpd`` (import ``dispynb.httpd`` or use the attribute).",
    ),
    Name(
        "ClusterStatus",
    ),
    Name(
        "config",
        differs="``MsgTimeout`` scales the connect and handshake timeouts (set "
        "as ``dispy.MsgTimeout``, as in dispy, or ``dispy.config.MsgTimeout``); "
        "``DispyPort`` set by the program is the port of nodes named without one, "
        "as ``dispy_port=`` (whose only effect in dispy was to set it); the other "
        "values are dispynb's ports, for programs that print them.",
    ),
    Name(
        "host_addrinfo",
        missing="An internal helper of dispy for choosing "
        "interfaces; dispynb takes ``host=`` and node addresses instead.",
    ),
    Name(
        "auth_code",
        missing="dispy's SHA-1 token; dispynb authenticates with a "
        "mutual HMAC challenge-response (see the security model).",
    ),
]

#: ``JobCluster(...)`` keyword parameters, in dispy's order.
JOBCLUSTER = [
    Name(
        "computation",
        differs="A callable travels by value; a program path "
        "is sent and run as in dispy. An ``async def`` function (as computation, "
        "setup or cleanup) is refused at once: nodes call it as a plain function; "
        "return ``asyncio.run(...)`` of a coroutine from a ``def`` one instead.",
    ),
    Name(
        "nodes",
        differs="Also a ``LocalCluster``; the default port is 9711; "
        "wildcards and ``None``/``'*'`` discover nodes started with discovery.",
    ),
    Name(
        "depends",
        differs="Never mutated (dispy's default list was shared); "
        "files are content-addressed and cached on nodes. A program (a file with "
        "an execute bit) stays executable, as in dispy, so ``./tool.sh`` runs, "
        "also one of a job's own files (``dispy_job_depends``); the others arrive "
        "readable, not executable, and every file is dated 2000-01-01 (dispy kept "
        "its times).",
    ),
    Name("job_status"),
    Name("cluster_status"),
    Name(
        "host",
        differs="The address discovery pings are sent from; nodes never "
        "connect back to the client.",
    ),
    Name(
        "dispy_port",
        differs="The port of the nodes named without one, as ``dispynb-node -p "
        "PORT`` pairs with it (dispy: the client on the port, nodes on the next); "
        "discovered nodes say theirs. For ``SharedJobCluster``, the port of a "
        "``scheduler_host`` named without one, as ``dispynb-scheduler -p PORT`` "
        "pairs with it (dispy: the scheduler two ports up).",
    ),
    Name(
        "ext_host",
        differs="Accepted and unused: nodes never connect to the "
        "client, so a client behind NAT needs nothing.",
    ),
    Name("ip_addr", note="Deprecated alias of ``host`` (logs a warning), as in dispy."),
    Name("ext_ip_addr", note="Deprecated alias of ``ext_host``, as in dispy."),
    Name(
        "node_port",
        note="dispy's keyword up to 4.10: the port of the nodes named without one "
        "(default ``dispy_port``, else 9711).",
    ),
    Name(
        "port",
        differs="dispy's keyword up to 4.10 for the client's port: accepted and "
        "unused, nodes never connect to the client.",
    ),
    Name("ipv4_udp_multicast"),
    Name(
        "dest_path",
        differs="As in dispy, a directory under the client's address on the node, "
        "shared by the client's computations that give it: what one leaves there "
        "with ``cleanup=False`` (its files, what its jobs or setup wrote) the next "
        "one finds, and ``cleanup=True`` removes it once no computation uses it "
        "(through a shared scheduler: each user's own). ``..`` and absolute paths "
        "are refused (dispy stripped a leading ``/``), and so is a path of more "
        "than 32 directories, when the cluster is made.",
    ),
    Name(
        "loglevel",
        differs="A `logging` level or its name. Not given: INFO to stderr, as "
        "dispy's, unless the program set up logging itself (before or after the "
        "cluster was made) or runs in a notebook.",
    ),
    Name("callback", note="Deprecated alias of ``job_status``, as in dispy."),
    Name(
        "setup",
        differs="No 10 s limit (see ``setup_timeout``); jobs are forked "
        "from the process that ran it, as in dispy.",
    ),
    Name("cleanup"),
    Name(
        "ping_interval",
        note="Also tries named nodes that are away (not started yet, or lost) "
        "again that often, for as long as the cluster is open; ``JobCluster()`` "
        "then waits for them.",
    ),
    Name(
        "pulse_interval",
        differs="Nodes pulse every second by default; a node "
        "silent for 3 pulses is declared dead. As in dispy, ``cluster_status`` "
        "hears ``AvailInfo`` at each pulse when ``pulse_interval`` is given, else "
        "every 10 minutes.",
    ),
    Name(
        "poll_interval",
        differs="Accepted; results always come back over the "
        "client's own connection, so there is nothing to poll.",
    ),
    Name("reentrant", differs="Retried at most ``max_attempts`` times (default 3)."),
    Name(
        "secret",
        differs="Required for nodes off loopback (or TLS); also "
        "``secret_file`` or the ``DISPYNB_SECRET``/``DISPYNB_SECRET_FILE`` "
        "environment variables.",
    ),
    Name("keyfile"),
    Name(
        "certfile",
        differs="TLS 1.2+ with certificate checks; ``cafile`` verifies the nodes.",
    ),
    Name(
        "recover_file",
        differs="An SQLite journal without the secret. Without it, a script's "
        "clusters write dispy's default ``_dispy_<time>_<pid>`` (0600, no per-job "
        "cost); notebooks, interactive sessions and ``LocalCluster`` write none; "
        "``recover_file=False`` turns it off.",
    ),
]

#: ``SharedJobCluster(...)``'s parameters that ``JobCluster`` does not have.
SHARED = [
    Name(
        "scheduler_host",
        note="Connects to a ``dispynb-scheduler``, which shares its nodes between "
        "users; the cluster proves its user's credential (``secret_file=``).",
    ),
    Name(
        "client_port", differs="Accepted and unused: nodes never connect to the client."
    ),
    Name(
        "exclusive",
        differs="With a scheduler, for the users its administrator names "
        "(``dispynb-scheduler --exclusive_users``, none by default): the "
        "computation's jobs run once other users' jobs ended, and no other user's "
        "job starts while it is open. Another user's exclusive cluster runs "
        "shared, with a warning saying whom to ask (dispy's scheduler let every "
        "user stop everyone else's jobs).",
    ),
]

#: Methods and properties of ``JobCluster`` (and ``SharedJobCluster``).
METHODS = [
    Name(
        "submit",
        differs="Arguments that cannot be pickled raise ``SerializationError`` at "
        "once, naming the argument (a ``TypeError`` and ``pickle.PicklingError`` "
        "too, as pickle's own errors; dispy returned the job and ended it "
        "``Cancelled`` when it failed to send it); after ``close()`` it raises "
        "``ClusterError`` (dispy's raised ``AttributeError``).",
    ),
    Name("submit_job_id"),
    Name(
        "submit_node",
        note="Also through a ``dispynb-scheduler``, as dispy's: only that node runs "
        "the job; if it leaves first, the job ends ``Abandoned``.",
    ),
    Name("submit_job_id_node"),
    Name("cancel"),
    Name("discover_nodes"),
    Name(
        "allocate_node",
        note="Also through a ``dispynb-scheduler``, as dispy's: it gives back a "
        "node ``deallocate_node`` took out (on all its CPUs) or ``close_node`` "
        "closed; a node that is none of the cluster's returns -1 (only the "
        "scheduler's operator adds nodes).",
    ),
    Name(
        "deallocate_node",
        differs="As dispy's, the node gets no job, ``submit_node`` to it returns "
        "None, until ``allocate_node`` gives it back; ``set_node_cpus`` with a "
        "positive count gives it back too (dispy's did not). Also through a "
        "``dispynb-scheduler``, as dispy's: the scheduler sends that cluster's "
        "jobs elsewhere (those there finish, those pinned to it wait), other "
        "users' still go there.",
    ),
    Name(
        "close_node",
        note="Also through a ``dispynb-scheduler``, as dispy's: only the cluster's "
        "own computation closes there (other users' jobs go on), and the "
        "scheduler does not set it up there again until ``allocate_node`` names "
        "the node.",
    ),
    Name(
        "resetup_node",
        differs="On a ``SharedJobCluster`` through a ``dispynb-scheduler`` it raises "
        "``NotSupportedError`` (dispy's did nothing there: its scheduler sets the "
        "computation up on the nodes); ``close_node`` then ``allocate_node`` sets "
        "it up there again.",
    ),
    Name(
        "node_jobs",
        note="A node not of the cluster: -1, as dispy's ``JobCluster`` (``[]`` on "
        "a ``SharedJobCluster``, as dispy's); one it released with ``close_node`` "
        "or sets up again: ``[]``, as dispy's.",
    ),
    Name(
        "set_node_cpus",
        differs="Through a ``dispynb-scheduler`` it limits the cluster's own jobs "
        "on the node, never other users' (dispy's scheduler allowed it to an "
        "``exclusive`` cluster only, and then for every cluster); it returns the "
        "CPUs the cluster may use there, as ``JobCluster``'s (dispy's "
        "``SharedJobCluster`` returned 0).",
    ),
    Name(
        "send_file",
        differs="The file arrives as ``depends``' files do: a program stays "
        "executable, the others readable, not executable, dated 2000-01-01 (dispy "
        "kept the times too).",
    ),
    Name("name", extra={"instance": "1"}),
    Name("status"),
    Name("print_status"),
    Name("stats"),
    Name("wait"),
    Name("__call__"),
    Name(
        "close",
        differs="``close(terminate=True)`` without a timeout cancels the jobs at once, "
        "as dispy's docstring says (its code waits for them all).",
    ),
    Name("shutdown"),
    Name("__enter__"),
    Name(
        "__exit__",
        differs="Closes as dispy's (waits for the jobs, also after an exception) but "
        "never swallows the exception (dispy's did); KeyboardInterrupt and SystemExit "
        "terminate the jobs.",
    ),
]

#: Reserved keyword arguments of ``submit``.
SUBMIT_KEYWORDS = [
    Name("dispy_job_depends"),
]

#: ``DispyJob`` attributes and methods.
JOB = [
    Name("id"),
    Name("result"),
    Name(
        "stdout",
        note="What the job and the threads it started printed while it ran; on "
        "dispynb's nodes also what they wrote below Python (``os.system``, "
        "programs they started, C code), in order among the prints (dispy kept "
        "only Python's prints, as the Dask and Ray engines do). On "
        "dispynb's nodes and the Dask engine, what a thread it left running prints "
        "once it returned goes to the node's own stdout and stderr (the Dask "
        "runner's), never into another job's. A log handler an earlier job made "
        "(``logging.basicConfig()``) logs into the stderr of the job running, as in "
        "dispy, where each job has a process of its own.",
    ),
    Name("stderr"),
    Name("exception"),
    Name("submit_time"),
    Name("start_time"),
    Name("end_time"),
    Name("status"),
    Name("ip_addr"),
    Name("finish"),
    Name(
        "__call__",
        differs="``job()`` blocks until the job ends (provisional results do not "
        "end the wait, as in dispy) and returns ``result``. ``clear=True`` is "
        "accepted and leaves ``finish`` set: dispy cleared it, so a second "
        "``job()`` blocked for ever; here it returns the result again.",
    ),
    Name("__lt__"),
]

#: dispy's status numbers (``DispyJob.X`` and ``DispyNode.X``).
STATUSES = [
    Name("DispyNode.Initialized", value=4),
    Name("DispyJob.Created", value=5),
    Name("DispyJob.Running", value=6),
    Name("DispyJob.ProvisionalResult", value=7),
    Name("DispyJob.Cancelled", value=8),
    Name("DispyJob.Terminated", value=9),
    Name("DispyJob.Abandoned", value=10),
    Name("DispyJob.Finished", value=11),
    Name("DispyNode.Closed", value=16),
    Name("DispyNode.AvailInfo", value=17),
]

#: ``DispyNode`` attributes.
NODE = [
    Name("ip_addr"),
    Name("name"),
    Name("cpus"),
    Name("avail_cpus"),
    Name("busy"),
    Name("jobs_done"),
    Name("cpu_time"),
    Name("tx"),
    Name("rx"),
    Name("update_time"),
    Name("avail_info"),
]

#: ``DispyNodeAvailInfo`` attributes.
AVAIL_INFO = [Name("cpu"), Name("memory"), Name("disk"), Name("swap")]

#: ``NodeAllocate(...)`` parameters, then ``allocate(...)``'s.
NODE_ALLOCATE = [
    Name("host"),
    Name("port"),
    Name(
        "cpus",
        differs="A negative count (all but that many) that leaves a node no CPU "
        "declines it (the next allocation that fits is asked, as in dispy); "
        "dispy's used all its CPUs then.",
    ),
    Name("depends"),
    Name("setup_args"),
]
ALLOCATE = [
    Name("cluster"),
    Name("ip_addr"),
    Name("name"),
    Name("cpus"),
    Name("avail_info"),
    Name("platform"),
]

#: Names a computation finds in its globals on a node.
JOB_GLOBALS = [
    Name("dispy_node_name"),
    Name("dispy_node_ip_addr"),
    Name("dispy_job_path"),
    Name(
        "dispy_provisional_result",
        differs="Goes over the node's connection to "
        "the client; ``relay`` and ``timeout`` are accepted.",
    ),
    Name(
        "dispy_send_file",
        differs="Saved under the client's ``files_dir`` (default: its current "
        "directory), never outside it. On dispynb's nodes (directly or through a "
        "scheduler) and on the Dask and Ray engines it returns 0 once the client "
        "wrote the file, -1 if it did not (its disk full, the folder not "
        "writable, the client gone), the reason on "
        "the job's stderr; ``timeout`` bounds the wait for the client's answer "
        "(None, the default, waits). From a process the job started "
        "(``multiprocessing``) it returns 0 once the file is sent, unconfirmed; "
        "from a thread the job started, -1 once the job has returned (the file "
        "may still arrive; on Ray the thread still gets its answer). The "
        "client's copy is private (mode 600) and dated when written (dispy's took "
        "the node file's mode and times).",
    ),
    Name(
        "dispynode_logger",
        note="Records go to the node's console or log, not to the job's stderr; "
        "debug ones too when the node runs with ``-d``.",
    ),
    Name(
        "dispynode_shutdown",
        differs="Callable from a job too, not only from cleanup; the node stops (as "
        "on SIGTERM) only if started with ``--client_shutdown``, otherwise it logs "
        "that it refused.",
    ),
]

#: Modules dispy's computations could use without importing them (dispy ran them in
#: dispynode's own globals). Programs that rely on one need that import otherwise.
IMPLICIT_MODULES = [Name(module) for module in (*DISPY_MODULES, "psutil")] + [
    Name("netifaces", missing="Not used by dispynb; import it in the computation."),
    Name("pycos", missing="dispy's own runtime library; not used by dispynb."),
    Name("dispy", missing="Import ``dispynb`` in the computation if it needs it."),
]

#: ``dispynode.py`` options, with arguments that exercise each one.
NODE_OPTIONS = [
    Name(
        "--config",
        sample=("--config", "{dir}/node.ini"),
        meaning="options from an INI file; its host lists were evaluated as Python",
        note="Same format (``[DEFAULT]``, dispy's keys); lists are read as literals, "
        "never evaluated; the command line wins. Options under another section, "
        "which dispy ignored, are refused.",
    ),
    Name(
        "--save_config",
        sample=("--save_config", "{dir}/saved.ini"),
        meaning="write the options to a file (standard output without one) and exit",
        note="Writes the options given (mode 600), never the secret, and exits; "
        "without a file, to standard output. Paths are written absolute, so that a "
        "service started elsewhere finds the same files.",
    ),
    Name("-c", sample=("-c", "1"), meaning="CPUs to serve; negative: all but N"),
    Name(
        "--cpus", sample=("--cpus", "1"), meaning="CPUs to serve; negative: all but N"
    ),
    Name(
        "-d",
        sample=("-d",),
        meaning="debug logging",
        note="``--loglevel debug`` too. dispynb-node's own ``-d`` used to be the "
        "destination directory: that is ``--dest-path`` now.",
    ),
    Name(
        "--debug",
        sample=("--debug",),
        meaning="debug logging",
    ),
    Name(
        "-i",
        sample=("-i", "127.0.0.1"),
        meaning="interface to use (repeatable)",
        note="Listens on each (one port); discovery on the non-loopback ones; a "
        "non-loopback address needs a secret or TLS. dispy's older ``--ip_addr`` "
        "works too.",
    ),
    Name(
        "--host",
        sample=("--host", "127.0.0.1"),
        meaning="interface to use (repeatable)",
        note="Listens on each (one port); discovery on the non-loopback ones; a "
        "non-loopback address needs a secret or TLS.",
    ),
    Name(
        "--ext_host",
        sample=("--ext_host", "127.0.0.1"),
        meaning="address announced for clients behind NAT",
        note="One address; clients follow it only if it fits one of their node specs "
        "narrower than ``'*'``.",
    ),
    Name(
        "-p",
        sample=("-p", "9711"),
        meaning="base port: the node on P+1, clients on P",
        differs="The node's own TCP port (default 9711).",
    ),
    Name(
        "--dispy_port",
        sample=("--dispy_port", "9711"),
        meaning="base port: the node on P+1, clients on P",
        missing="Use ``--port`` and ``--discovery-port`` (9712/9713 by default, so "
        "dispy and dispynb nodes can share a machine).",
    ),
    Name(
        "--ipv4_udp_multicast",
        sample=("--ipv4_udp_multicast",),
        meaning="multicast instead of broadcast discovery",
        note="Also answers on dispy's group 239.255.61.59.",
    ),
    Name("--name", sample=("--name", "node1"), meaning="``dispy_node_name``"),
    Name(
        "--dest_path_prefix",
        sample=("--dest_path_prefix", "{dir}/dest"),
        meaning="root of the clients' files",
        note="Default ``<tmp>/dispynb``.",
    ),
    Name(
        "--init",
        sample=("--init", "{dir}/init.py"),
        meaning="node-wide ``init()`` whose globals every computation sees",
        missing="Computations never share the node server's process: use the "
        "cluster's ``setup`` (once per node, before its jobs) or ``depends``.",
    ),
    Name(
        "--scheduler_host",
        sample=("--scheduler_host", "127.0.0.1"),
        meaning="announce the node to a dispyscheduler",
        differs="Registers the node with a ``dispynb-scheduler`` started with "
        f"``--register_port`` (port {SCHEDULER_REGISTER_PORT} unless ``HOST:PORT`` "
        "says another), over "
        "TCP and proving the node secret (so the node needs one), waiting for a "
        "scheduler not up yet; the scheduler then uses it as one named with "
        "``-n``.",
    ),
    Name(
        "--scheduler_port",
        sample=("--scheduler_host", "127.0.0.1", "--scheduler_port", "9800"),
        meaning="the port of ``--scheduler_node`` (dispynode up to 4.10)",
        note="The port the scheduler takes registrations on (its "
        "``--register_port``); the same as ``--scheduler_host HOST:PORT``.",
    ),
    Name(
        "--max_file_size",
        sample=("--max_file_size", "10M"),
        meaning="largest file, with k/m/g/t suffixes",
        note="Default 512M (dispy: unlimited); ``--transfer-quota`` also bounds "
        "all the files of one computation.",
    ),
    Name(
        "--zombie_interval",
        sample=("--zombie_interval", "60"),
        meaning="minutes before a silent client's computations are freed",
        note="``--orphan-timeout`` is the same in seconds.",
    ),
    Name(
        "--ping_interval",
        sample=("--ping_interval", "10"),
        meaning="announce the node every SEC seconds",
    ),
    Name(
        "--service_start",
        sample=("--service_start", "08:00", "--service_stop", "18:00"),
        meaning="daily service window: start serving at HH:MM",
        note="From start it serves; from stop it takes no new clients (connected "
        "ones go on); from end it has none (their running jobs are terminated) "
        "until the next start. Start needs stop or end.",
    ),
    Name(
        "--service_stop",
        sample=("--service_stop", "18:00"),
        meaning="daily service window: take no new clients from HH:MM",
    ),
    Name(
        "--service_end",
        sample=("--service_end", "19:00"),
        meaning="daily service window: end the clients' jobs at HH:MM",
    ),
    Name(
        "--serve",
        sample=("--serve", "1"),
        meaning="exit after N clients; 0: at once",
        note="N client connections (one per cluster); 0 exits at once, after "
        "``--clean``.",
    ),
    Name(
        "--client_shutdown",
        sample=("--client_shutdown",),
        meaning="cleanup functions may call ``dispynode_shutdown()``",
        note="From a job or cleanup; without the option the call is refused and "
        "logged.",
    ),
    Name(
        "--force_cleanup",
        sample=("--force_cleanup",),
        meaning="remove client files even with ``cleanup=False``",
    ),
    Name(
        "--msg_timeout",
        sample=("--msg_timeout", "10"),
        meaning="timeout of every socket operation",
        differs="Seconds a connecting client gets to authenticate (default 5); "
        "connected clients are watched by pulses.",
    ),
    Name("-s", sample=("-s", "{secret}"), meaning="shared secret"),
    Name("--secret", sample=("--secret", "{secret}"), meaning="shared secret"),
    Name(
        "--admin_secret",
        sample=("--admin_secret", "{secret}"),
        meaning="dispyadmin's secret",
        missing="There is no admin program; manage nodes from a client "
        "(``set_node_cpus``, ``close_node``) or its web monitor.",
    ),
    Name("--certfile", sample=("--certfile", "{dir}/cert.pem"), meaning="TLS"),
    Name(
        "--keyfile",
        sample=("--keyfile", "{dir}/key.pem", "--certfile", "{dir}/cert.pem"),
        meaning="TLS",
        note="TLS 1.2+; ``--cafile`` adds client certificates.",
    ),
    Name(
        "--clean",
        sample=("--clean",),
        meaning="kill a previous node's processes and wipe the prefix",
        differs="Empties the destination directory at start, unless another node "
        "runs on it (then it stops, saying so); there are no PID files to kill: a "
        "node's processes die with it.",
    ),
    Name(
        "--unsafe_setup",
        sample=("--unsafe_setup",),
        meaning="run ``setup`` in the node's main process",
        missing="``setup`` always runs in the computation's own process, never "
        "in the node server.",
    ),
    Name(
        "--daemon",
        sample=("--daemon",),
        meaning="do not read commands from standard input",
        differs="Without it the node reads ``quit``, ``exit``, ``stop``, ``start``, "
        "``cpus`` and status (Enter) from standard input, as dispynode; at its end "
        "(``/dev/null``, a closed pipe) the node goes on serving, where dispynode "
        "exited (see Commands on its standard input in the deploy how-to).",
    ),
]

#: ``dispyscheduler.py`` options (dispy 4.15), with arguments that exercise each one
#: (``{dir}`` also holds a throwaway ``cert.pem`` and ``key.pem``).
SCHEDULER_OPTIONS = [
    Name(
        "--config",
        sample=("--config", "{dir}/sched.ini"),
        meaning="options from an INI file",
        note="Reads dispyscheduler's files: its keys at dispy's defaults count as "
        "not given; lists are read as literals; the command line wins.",
    ),
    Name(
        "--save_config",
        sample=("--save_config", "{dir}/saved.ini"),
        meaning="write the options to a file and exit",
        note="Writes the options given (mode 600), never ``--node_secret``; "
        "without a file, to standard output.",
    ),
    Name("-d", sample=("-d",), meaning="debug logging"),
    Name("--debug", sample=("--debug",), meaning="debug logging"),
    Name(
        "-n",
        sample=("-n", "127.0.0.1"),
        meaning="a node used for all computations (repeatable); default ``'*'``",
        note="A node, or a pattern discovered by broadcast (``'*'``, "
        "``'10.0.0.*'``); nodes may also register themselves (``--register_port``).",
    ),
    Name(
        "--node",
        sample=("--node", "127.0.0.1"),
        meaning="a node used for all computations (repeatable); default ``'*'``",
    ),
    Name(
        "-i",
        sample=("-i", "127.0.0.1"),
        meaning="interface to use (repeatable)",
        differs="The interfaces clients connect to; default 127.0.0.1 (dispy: "
        "every interface).",
    ),
    Name(
        "--host",
        sample=("--host", "127.0.0.1"),
        meaning="interface to use (repeatable)",
        differs="The interfaces clients connect to; default 127.0.0.1 (dispy: "
        "every interface).",
    ),
    Name(
        "--ext_host",
        sample=("--ext_host", "127.0.0.1"),
        meaning="address announced for clients behind NAT",
        missing="Clients connect to the scheduler (give them an address that "
        "reaches it), and it connects to its nodes: nothing to announce.",
    ),
    Name(
        "-p",
        sample=("-p", "9700"),
        meaning="base port: clients reach the scheduler on P+2",
        differs="The scheduler's own port for clients (default 9712).",
    ),
    Name(
        "--port",
        sample=("--port", "9700"),
        meaning="base port: clients reach the scheduler on P+2",
        differs="The scheduler's own port for clients (default 9712).",
    ),
    Name(
        "--ipv4_udp_multicast",
        sample=("--ipv4_udp_multicast",),
        meaning="multicast instead of broadcast discovery",
    ),
    Name(
        "--node_port",
        sample=("--node_port", "9800"),
        meaning="the port the nodes listen on (dispyscheduler up to 4.10)",
        note="The port of the nodes named with ``-n`` without one (default "
        f"{NODE_PORT}); discovered and registering nodes say their own.",
    ),
    Name(
        "--poll_interval",
        sample=("--poll_interval", "10"),
        meaning="seconds between polls of the nodes for job results "
        "(dispyscheduler 3.15 to 4.2)",
        differs="Accepted and not needed: the scheduler keeps a connection to "
        "each node, which sends results as they come.",
    ),
    Name(
        "--node_secret",
        sample=("--node_secret", "{secret}"),
        meaning="the nodes' shared secret",
        note="``--node_secret_file`` or ``DISPYNB_SECRET`` keep it out of the "
        "process list.",
    ),
    Name(
        "--node_keyfile",
        sample=("--node_keyfile", "{dir}/key.pem", "--node_certfile", "{dir}/cert.pem"),
        meaning="TLS towards the nodes",
    ),
    Name(
        "--node_certfile",
        sample=("--node_certfile", "{dir}/cert.pem"),
        meaning="TLS towards the nodes",
        note="``--node_cafile`` checks the nodes' certificates.",
    ),
    Name(
        "--cluster_secret",
        sample=("--cluster_secret", "{secret}"),
        meaning="the secret all clients share",
        missing="Each user proves a credential of its own: issue them with "
        "``dispynb-scheduler user add NAME``.",
    ),
    Name(
        "--cluster_certfile",
        sample=("--cluster_certfile", "{dir}/cert.pem"),
        meaning="TLS towards the clients",
    ),
    Name(
        "--cluster_keyfile",
        sample=(
            "--cluster_keyfile",
            "{dir}/key.pem",
            "--cluster_certfile",
            "{dir}/cert.pem",
        ),
        meaning="TLS towards the clients",
    ),
    Name(
        "--pulse_interval",
        sample=("--pulse_interval", "5"),
        meaning="seconds between checks that nodes are alive",
        note="0 (dispyscheduler's default) is the default pace, 1 s.",
    ),
    Name(
        "--ping_interval",
        sample=("--ping_interval", "10"),
        meaning="seconds between discovery pings",
        note="0 (dispyscheduler's default): once, at start.",
    ),
    Name(
        "--zombie_interval",
        sample=("--zombie_interval", "60"),
        meaning="minutes before a silent client counts as a zombie",
        note="Fractions are taken; 0: never. Also how long the results of a "
        "client that went away are kept.",
    ),
    Name(
        "--msg_timeout",
        sample=("--msg_timeout", "10"),
        meaning="timeout of every socket operation",
        differs="How long connecting to a node may take; a handshake gets half "
        "of it. Connected nodes and clients are watched by pulses.",
    ),
    Name(
        "--dest_path_prefix",
        sample=("--dest_path_prefix", "{dir}/dest"),
        meaning="where the clients' files are stored",
        differs="Where results kept for clients that went away spill to disk; "
        "the clients' files go to the nodes.",
    ),
    Name(
        "--max_file_size",
        sample=("--max_file_size", "10M"),
        meaning="largest file, with k/m/g/t suffixes",
        note="Default 512M (dispy: unlimited); 0: no limit.",
    ),
    Name(
        "--clean",
        sample=("--clean",),
        meaning="remove the clients' files before starting",
        note="Removes what a killed scheduler left under ``--dest_path_prefix``.",
    ),
    Name(
        "--httpd",
        sample=("--httpd",),
        meaning="web monitor of all clients' clusters (port 8181)",
        differs="On 127.0.0.1 unless ``--httpd_host`` (then with "
        "``--httpd_certfile``); it needs its access token, printed on the terminal "
        "or kept in ``--httpd_token_file``.",
    ),
    Name(
        "--fair_cluster_scheduler",
        sample=("--fair_cluster_scheduler",),
        meaning="give the next job to the least recently served cluster",
        differs="Accepted: CPUs are always shared fairly between users.",
    ),
    Name(
        "--early_cluster_scheduler",
        sample=("--early_cluster_scheduler",),
        meaning="give the next job to the earliest cluster",
        missing="Scheduling is always fair share between users.",
    ),
    Name(
        "--cooperative",
        sample=("--cooperative",),
        meaning="clients may change the nodes' CPUs",
        missing="Bound what users take with ``--cpus`` (per node) or "
        "``--max_cpus`` (per user).",
    ),
    Name(
        "--cleanup_nodes",
        sample=("--cleanup_nodes",),
        meaning="nodes remove files even for ``cleanup=False``",
        missing="Start the nodes with ``dispynb-node --force_cleanup``, which does "
        "that for every client, through a scheduler or not.",
    ),
    Name(
        "--daemon",
        sample=("--daemon",),
        meaning="do not read commands from standard input",
        differs="Accepted and not needed: dispynb-scheduler never reads standard "
        "input (stop it with SIGTERM or Ctrl-C).",
    ),
]

#: ``DispyHTTPServer(...)`` parameters and methods.
HTTPD = [
    Name("cluster"),
    Name(
        "host",
        differs="Binds 127.0.0.1 by default (dispy: every interface); another "
        "address needs HTTPS or ``allow_plain_http=True``. ``host=''`` without them "
        "serves 127.0.0.1 and logs a warning saying so, so dispy programs run "
        "unchanged.",
    ),
    Name("port"),
    Name(
        "poll_sec",
        differs="0 or less is taken as 1 with a warning, as dispy's; fractions of a "
        "second are kept (dispy raised anything under 1 to 1).",
    ),
    Name(
        "DocumentRoot",
        differs="Refused with a message: the monitor serves only its own page.",
    ),
    Name("keyfile"),
    Name("certfile"),
    Name("show_job_args", differs="Off by default (dispy: on)."),
]
HTTPD_METHODS = [
    Name(
        "add_cluster",
        note="The page then offers a choice of cluster; the JSON API takes "
        "``?cluster=<key>``.",
        missing="One monitor follows one cluster; start one per cluster.",
    ),
    Name("del_cluster", missing="See ``add_cluster``."),
    Name("shutdown"),
]

#: dispy's programs and the dispynb console script that replaces each, if any.
PROGRAMS = [
    Name(
        "dispynode.py",
        alias_of="dispynb-node",
        differs="Takes dispynode's options (below); serves beyond 127.0.0.1 only "
        "with a secret or TLS.",
    ),
    Name(
        "dispyscheduler.py",
        alias_of="dispynb-scheduler",
        differs="Nodes are named with ``-n`` or discovered (``-n '*'``, the "
        "default); each user has a credential (``dispynb-scheduler user add "
        "NAME``); fair share between users (``--fair_cluster_scheduler`` is "
        "accepted, ``--early_cluster_scheduler`` refused); ``--httpd`` needs its "
        "token. "
        "``--config`` reads dispyscheduler's files (its keys at dispy's defaults "
        "count as not given); ``-p`` is the scheduler's own port (dispy's base "
        "port: its scheduler listens on it + 2).",
    ),
    Name(
        "dispynetrelay.py",
        missing="Name the nodes of other subnets in "
        "``nodes=`` (or use wildcards for the subnets), no relay needed.",
    ),
    Name(
        "dispy_cmd.py",
        alias_of="dispynb run",
        differs="Takes dispy_cmd.py's options (``-a``, ``-f``, ``-n``, ``-c``, "
        "``-d``, ``--secret``, ``--certfile``, ``--keyfile``, ``--ip_addr``, "
        "``--scheduler_node``) and ``--secret-file``; without ``-a`` the program "
        "runs once (dispy_cmd.py ran nothing); it prints each run's exit code and "
        "output as text, and exits 1 if a run could not run.",
    ),
    Name("dispyadmin.py", missing="There is no admin program; see ``--admin_secret``."),
]
