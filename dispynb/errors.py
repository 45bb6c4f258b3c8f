"""The dispynb exception hierarchy, shared by the client and the node server.

::

    DispynbError
     +-- ProtocolError            malformed or unexpected data on the wire
     |    +-- FramingError        bad length prefix, oversized frame, truncated frame
     |    +-- MessageError        undecodable header, unknown op, missing field
     |    +-- ProtocolVersionError
     +-- AuthenticationError      wrong or missing secret, bad MAC, replayed frame
     +-- TransportError           socket-level failures
     |    +-- ConnectionClosedError
     |    |    +-- NodeBusyError  the node refused the connection for now
     |    |    +-- NodeNotServingError  the node runs but takes no new clients
     |    +-- ConnectTimeoutError
     +-- ConfigurationError       invalid options given by the user
     |    +-- NotSupportedError   a feature the cluster's engine does not provide
     |    +-- ShadowedPackageError  a user's msgpack.py (...) imported for the package
     +-- ClusterError
     |    +-- NoNodesError
     |    +-- NodeLostError
     |    +-- SetupError          a computation could not be set up on a node
     |    +-- JournalError        the recover_file could not be written (a full disk)
     +-- LaunchError              launched nodes did not start or did not register
     +-- KeptUnavailable          a node cannot read the results it kept, for now
     +-- JobError
     |    +-- SerializationError  arguments or results that cannot be (un)pickled
     |                            (also a TypeError and a pickle.PicklingError)
     |    +-- ResultTooLarge      a result over max_result_size
     +-- RemoteError              an exception raised by user code on a node

Errors of one layer are defined beside their code, in this tree: the wire's
`dispynb.protocol.discovery.DiscoveryError`,
`dispynb.protocol.registration.RegistrationError` and
`dispynb.transport.inbox.BadMessageError` (each a `MessageError`), and the
notebook's `dispynb.jupyter.errors.MagicError`, which IPython shows as one line.
"""

from __future__ import annotations

import pickle
import re


class DispynbError(Exception):
    """Base class of every error raised by dispynb."""


class ProtocolError(DispynbError):
    """The peer sent data that does not follow the dispynb protocol."""


class FramingError(ProtocolError):
    """A frame is malformed, truncated or larger than the allowed cap."""


class MessageError(ProtocolError):
    """A message header cannot be decoded or does not match its schema."""


class ProtocolVersionError(ProtocolError):
    """The peers speak different protocol versions."""


class AuthenticationError(DispynbError):
    """The peers do not share the secret, or a frame failed its MAC check."""


class TransportError(DispynbError):
    """A socket-level failure (refused, reset, TLS failure)."""


class ConnectionClosedError(TransportError):
    """The connection was closed, by the peer or locally."""


class NodeBusyError(ConnectionClosedError):
    """The node refused the connection for now (too many in their handshake, or too
    many failed handshakes from this address); retrying later may work."""


class NodeNotServingError(ConnectionClosedError):
    """The node runs but takes no new clients (``dispynb-node --serve N`` has
    served its last client); it exits once that client leaves, and a restarted
    node takes clients again."""


class ConnectTimeoutError(TransportError):
    """The connection or its handshake did not complete in time."""


class ConfigurationError(DispynbError, ValueError):
    """An option given by the user is invalid; the message says how to fix it."""


class NotSupportedError(ConfigurationError):
    """The cluster's engine cannot do what was asked (``JobCluster(engine=...)``):
    the message names the engine and the feature, and what to use instead."""


class ShadowedPackageError(ConfigurationError, ImportError):
    """A file of the user's (``msgpack.py`` beside the script) was imported in
    place of a package dispynb needs; the message names it and says to rename it."""


class ClusterError(DispynbError):
    """A cluster-level failure."""


class NoNodesError(ClusterError):
    """No node could be used for the computation: raised where work cannot be
    sized or placed without one (joblib's ``n_jobs=-1`` on an executor whose nodes
    are all gone). `JobCluster` raises the first node's own error instead."""


class NodeLostError(ClusterError):
    """A node went away while it had work: what ``result()`` of the future of a job
    that ended ``Abandoned`` raises (the message is the reason)."""


class SetupError(ClusterError):
    """A computation could not be set up on a node (loading or its setup failed).

    ``remote_traceback`` holds the node's traceback text, when there is one.
    """

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback


class JournalError(ClusterError):
    """The recovery file (``recover_file``) could not be written, a full disk say:
    the jobs it misses cannot be recovered after a crash (their results still come
    back to the running client). The message names the file and the cause."""


class LaunchError(DispynbError):
    """Launched nodes could not be started or did not register."""


class KeptUnavailable(DispynbError):
    """The node cannot read a kept result now, for want of memory, descriptors or
    disk space for its copy (`ResultSpool.open`): the result is not lost; the
    recovery sends the others, then tells its client why it ends."""


class JobError(DispynbError):
    """A job-level failure."""


class SerializationError(JobError, TypeError, pickle.PicklingError):
    """Arguments or results that cannot be pickled or unpickled.

    Also a `TypeError` and a `pickle.PicklingError`: what ``pickle.dumps`` raises
    for such a value, and what code written for dispy (or pickle) catches around a
    ``submit`` that pickles its arguments.
    """


class ResultTooLarge(JobError):
    """A job's pickled result is over the cluster's ``max_result_size``.

    The job ends ``Terminated`` with this error's name, the result's size and the
    option in ``job.exception``; the node never sends (nor holds) the result.
    """


class RemoteError(DispynbError):
    """An exception raised by user code on a node, carrying the remote traceback.

    ``job.future.result()`` raises it for a job that ended ``Terminated`` (it raised,
    exceeded a limit, crashed or was terminated); ``dispynb.Executor`` raises the
    job's own exception instead, with this as its ``__cause__``.

    Parameters
    ----------
    ename:
        Name of the remote exception type.
    evalue:
        ``str()`` of the remote exception.
    traceback:
        The formatted remote traceback text.
    where:
        For a job that failed as a whole (no exception of the user's code: its
        process died, a limit, a terminate): which job, on which node
        (``"job 5 on node 10.0.0.7"``). Its message then says so in plain words,
        with what to do, and ``ename`` is the job's status (``"Terminated"``),
        ``evalue`` the node's reason.
    """

    def __init__(
        self, ename: str, evalue: str, traceback: str, where: str = ""
    ) -> None:
        super().__init__(f"{ename}: {evalue}")
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.where = where

    @classmethod
    def from_text(
        cls, text: str, status: str = "Terminated", where: str = ""
    ) -> RemoteError:
        """Build one from a job's ``exception`` text: a formatted traceback (its last
        line names the exception) or a node's reason (``status`` is then the name,
        and ``where`` names the job and its node)."""
        lines = [line for line in text.strip().splitlines() if line.strip()]
        if lines and text.lstrip().startswith("Traceback"):
            match = _EXCEPTION_LINE.match(lines[-1])
            if match:
                return cls(match["name"], match["value"] or "", text)
        return cls(status, lines[0] if lines else "", text, where)

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str, str]]:
        return type(self), (self.ename, self.evalue, self.traceback, self.where)

    def __str__(self) -> str:
        head = f"{self.ename}: {self.evalue}"
        text = self.traceback.strip()
        if "Traceback (most recent call last)" not in text and text.startswith(
            self.evalue.strip()
        ):  # a node's reason (a crash, a limit): said once, not again as a traceback
            rest = text[len(self.evalue.strip()) :].lstrip("\n")
            if self.where:  # which job failed where, why, then what to do
                head = f"{self.where} failed ({self.ename}): {self.evalue}"
                advice = failure_advice(self.evalue)
                rest = "\n".join(part for part in (rest, advice) if part)
            return f"{head}\n{rest}" if rest else head
        return f"{head}\n\nRemote traceback:\n{self.traceback}"

    def _render_traceback_(self) -> list[str]:
        """Show the remote traceback in IPython instead of the local one (for a job
        that failed as a whole, what happened and what to do)."""
        if self.where and "Traceback (most recent call last)" not in self.traceback:
            return f"{type(self).__name__}: {self}".splitlines()
        return self.traceback.splitlines()


def failure_advice(reason: str) -> str:
    """What to do about a job whose worker process died for ``reason`` (a node's
    words, `dispynb.jobenv.crash_reason`); "" for a reason that says it already
    (a limit names the option to raise)."""
    killed = _KILLED_BY.search(reason)
    if killed is not None:
        signal = killed["signal"]
        if signal == "SIGKILL":
            return (
                "SIGKILL is most often the kernel's out-of-memory killer (see dmesg "
                "on the node) or a kill from outside the job: give the job less "
                "data, or a mem_limit, so that the call raises MemoryError instead."
            )
        if signal in _CRASH_SIGNALS:
            return (
                f"{signal} is a crash in compiled code (an extension module): run "
                "the call here under python -X faulthandler to see where."
            )
        return f"{signal} came from outside the job: something on the node sent it."
    if "worker process exited with status" in reason:
        return (
            "The call ended its own process (os._exit(), or compiled code that "
            "exits): run it here to see why, and read what it wrote in the job's "
            "stderr (job.stderr; an executor's future.job.stderr). The node started "
            "a new worker: other jobs run on."
        )
    return ""


#: A node's reason for a worker killed by a signal (`dispynb.jobenv.crash_reason`).
_KILLED_BY = re.compile(r"worker process was killed by (?P<signal>SIG\w+|signal \d+)")
#: Signals of a process crashing by itself (not sent from outside).
_CRASH_SIGNALS = frozenset({"SIGSEGV", "SIGBUS", "SIGABRT", "SIGFPE", "SIGILL"})


#: The last line of a formatted traceback: ``module.Name: message`` or ``Name``.
_EXCEPTION_LINE = re.compile(r"^(?P<name>[A-Za-z_][\w.]*)(?::\s?(?P<value>.*))?$")
