"""The Dask engine's workers: the computation set up on them (the fence on the
scheduler, the `_daskworker.ComputationPlugin` on the workers, their setup reports),
workers joining and leaving, files sent to one, their load, and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from dispynb.backends import _probe
from dispynb.backends._daskselect import _host_port
from dispynb.backends._daskstate import (
    CLOSE_TIMEOUT,
    CONNECT_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    MAX_SENT_FILE,
    PROBE_TIMEOUT,
    SETUP_WAIT,
    _as_bytes,
    _DaskState,
    logger,
)
from dispynb.backends.base import Departure, NodeInfo
from dispynb.errors import ConfigurationError, DispynbError, SetupError, TransportError
from dispynb.programs import read_program
from dispynb.protocol import serialize

if TYPE_CHECKING:
    from dispynb.depends import FileRef


class _Nodes(_DaskState):
    """The computation on the Dask workers, from `start` to `shutdown`."""

    # -- start-up (on the loop) ------------------------------------------------------

    async def start(self) -> None:
        import distributed

        from dispynb.backends import _daskfence
        from dispynb.backends._daskworker import ComputationPlugin

        self._ready_seen = asyncio.Event()
        if await self._nothing_listens():  # else Dask retries for CONNECT_TIMEOUT s
            raise self._refused_error()
        make_client: Any = distributed.Client  # untyped constructor
        client = make_client(
            self.engine.address,
            asynchronous=True,
            security=self.engine.security,
            set_as_default=False,
            timeout=CONNECT_TIMEOUT,
            name=f"dispynb-{self.config.name}",
        )
        try:
            # Dask's timeout covers the TCP connect only: a server that accepts
            # but never speaks Dask's protocol (the dashboard's port 8787, a Ray
            # head...) would keep the client waiting for its handshake for ever.
            async with asyncio.timeout(HANDSHAKE_TIMEOUT) as deadline:
                self.client = await client
        except Exception as exc:  # OSError, TimeoutError, a stranger's bytes...
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), CLOSE_TIMEOUT)
            if deadline.expired():
                raise TransportError(
                    f"no Dask scheduler answered at {self.engine.address} within "
                    f"{HANDSHAKE_TIMEOUT:g} s: something listens there but does "
                    f"not speak Dask's protocol (the scheduler's port is 8786 by "
                    f"default; 8787 is its dashboard)"
                ) from exc
            raise await self._connect_error(exc) from exc
        self.client.subscribe_topic(self.client.id, self._on_event)
        self.client.subscribe_topic("all", self._on_scheduler_event)
        import cloudpickle

        # the scheduler needs no dispynb: the fence travels by value
        cloudpickle.register_pickle_by_value(_daskfence)
        fence = _daskfence.Fence(self.prefix, self.max_attempts, self.client.id)
        await self.client.register_plugin(fence, name=self.fence_name)
        opts = self.config.options
        program = (
            read_program(opts.computation)
            if isinstance(opts.computation, str)
            else None
        )
        bundle = {
            "func": None if program else opts.computation,
            "program": program,
            "setup": opts.setup,
            "cleanup": opts.cleanup if callable(opts.cleanup) else None,
            "setup_args": (),
            "names": dict(self.config.depends.names),
        }
        files = [(ref.relative, ref.read()) for ref in self.config.depends.files]
        max_output = opts.max_output_size
        plugin = ComputationPlugin(
            self.uid,
            self.client.id,
            [_as_bytes(b) for b in serialize.dumps(bundle)],
            files,
            opts.dest_path,
            max_output if isinstance(max_output, int) else None,
            MAX_SENT_FILE,
            fresh=opts.fresh_process,
        )
        try:
            responses = await self.client.register_plugin(plugin, name=self.plugin_name)
        except Exception as exc:
            if not _cannot_import(exc):
                raise
            raise SetupError(
                f"the Dask workers cannot load dispynb ({_unwrapped(exc)}): install "
                "dispynb on them (pip install dispynb) with the same version as here"
            ) from exc
        await self._check_wanted()
        await self._await_setup(set(responses))

    async def _nothing_listens(self) -> bool:
        """True if the scheduler's TCP port refuses connections: nothing listens
        there, which Dask's client retries for its whole timeout (10 s) before
        saying only that it timed out. (An unreachable or silent address: False,
        Dask's own connection says what it is.)"""
        address = self.engine.address
        if not (address.startswith("tcp://") or "://" not in address):
            return False  # TLS, UCX...: Dask's connection tells
        host, port = _host_port(address)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), PROBE_TIMEOUT
            )
        except ConnectionRefusedError:
            return True
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return False

    def _refused_error(self) -> TransportError:
        return TransportError(
            f"cannot connect to the Dask scheduler at {self.engine.address}: "
            "nothing listens there (connection refused): start the scheduler (`dask "
            "scheduler` prints the address to give), or check the address (the "
            "scheduler's port is 8786 by default)"
        )

    async def _connect_error(self, exc: Exception) -> TransportError:
        """The error for a connection to the scheduler that failed with ``exc``
        before its deadline: nothing listens there, or a server that is not Dask's
        answered (Dask's client read its bytes as frames: an HTTP answer is a
        ``MemoryError`` "Unable to allocate 3.07 EiB"), which a probe names."""
        address = self.engine.address
        host, port = _host_port(address)
        answer = None
        refused = False
        if address.startswith("tcp://") or "://" not in address:
            try:
                answer = await asyncio.to_thread(
                    _probe.probe, host, port, PROBE_TIMEOUT
                )
            except ConnectionRefusedError:
                refused = True
            except OSError:
                pass
        if answer is None:
            if not isinstance(exc, OSError):
                raise exc  # not the connection's fault: Dask's own error
            if refused:  # Dask says only that it "timed out" retrying
                return self._refused_error()
            return TransportError(
                f"cannot connect to the Dask scheduler at {address}: {exc}"
            )
        return TransportError(
            f"no Dask scheduler answered at {address}: something listens there but "
            f"it is not a Dask scheduler: {answer.found} (the scheduler's port is "
            f"8786 by default; 8787 is its dashboard)"
        )

    async def _check_wanted(self) -> None:
        """Raise `ConfigurationError` if ``nodes=`` names no worker of the cluster
        (Dask would keep the jobs waiting for one for ever)."""
        if self.wanted is None:
            return
        info = await self.client.scheduler.identity()
        workers = {a: str(w.get("name", "")) for a, w in info["workers"].items()}
        self.matched = {a for a, n in workers.items() if self._is_wanted(a, n)}
        if not self.matched:
            listing = ", ".join(f"{n} ({a})" for a, n in sorted(workers.items()))
            raise ConfigurationError(
                f"nodes={self.wanted}: no worker of the Dask cluster at "
                f"{self.engine.address} matches (give worker addresses, hosts or "
                f"names, or patterns of them such as '10.0.0.*' or 'local-*'); its "
                f"workers are: {listing or 'none'}"
            )

    async def _await_setup(self, workers: set[str]) -> None:
        """Wait (bounded) for the setup reports of the workers present."""
        assert self._ready_seen is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.options.setup_timeout or SETUP_WAIT)
        while not workers <= (set(self.workers) | set(self.failed) | self.unwanted):
            self._ready_seen.clear()
            try:
                await asyncio.wait_for(self._ready_seen.wait(), deadline - loop.time())
            except TimeoutError:
                logger.info("Dask workers are still setting up; jobs will wait")
                return
        if self.failed and not self.workers:
            address, (message, remote) = next(iter(self.failed.items()))
            raise SetupError(
                f"setup failed on every Dask worker; on {address}: {message}", remote
            )

    def _worker_ready(
        self,
        uid: str,
        address: str,
        nthreads: int,
        name: str,
        error: str,
        remote_traceback: str = "",
    ) -> None:
        """A worker set the computation up, or could not (``error``, and setup's
        traceback if it raised)."""
        if uid != self.uid or self.closed:
            return
        if not self._is_wanted(address, str(name)):
            self.unwanted.add(address)  # not among nodes=: set up, never used
            if self._ready_seen is not None:
                self._ready_seen.set()
            return
        if error:
            self.failed[address] = (error, remote_traceback)
            sources = self.config.sources  # the user's file and lines, as locally
            if sources is not None:
                remote_traceback = sources.rerender(remote_traceback) or ""
            shown = "\n".join(filter(None, (error, remote_traceback)))
            logger.warning("setup failed on Dask worker %s: %s", address, shown)
        else:
            host, port = _host_port(address)
            node = NodeInfo(address, host, port, name, int(nthreads))
            self.workers[address] = node
            self.events.node_ready(node)
        if self._ready_seen is not None:
            self._ready_seen.set()

    def _on_scheduler_event(self, event: tuple[float, Any]) -> None:
        message = event[1]
        if not isinstance(message, dict) or message.get("action") != "remove-worker":
            return
        address = message.get("worker", "")
        self.failed.pop(address, None)
        node = self.workers.pop(address, None) or self._node(address)
        for dask_key in message.get("processing-tasks") or ():
            key = self._key_of(dask_key)
            if key is None or key not in self.futures:
                continue
            self.started.pop(key, None)
            # Dask sends a worker tasks ahead, to wait behind its running ones:
            # only a job whose start was announced is known to have run.
            ran = key in self.running[address]
            self.running[address].discard(key)
            count = self.lost[key] = self.lost.get(key, 0) + 1
            if count < self.max_attempts:
                self.events.job_requeued(key)  # Dask runs it again elsewhere
                continue
            self.futures.pop(key, None)  # the fence cancels it on the scheduler
            self.lost.pop(key, None)
            self.sizes.pop(key, None)
            why = "not reentrant" if not self.reentrant else "max_attempts reached"
            when = (
                "while it ran"
                if ran
                else "while the job waited there or had just begun"
            )
            reason = f"its Dask worker {address} was lost {when} ({why})"
            self.events.job_abandoned(key, node, reason)
        self.running.pop(address, None)
        if address in self.workers or node.cpus or not self.closed:
            self.events.node_closed(node, "the Dask worker left", Departure.LOST)

    # -- nodes ----------------------------------------------------------------------

    def send_file(self, node_id: str, ref: FileRef) -> str:
        """Write a file into the computation's directory on one Dask worker
        (``Client.run`` there); '' or the error."""
        from dispynb.backends._daskworker import receive_file

        try:
            data = ref.read()
        except OSError as exc:
            return f"cannot read {ref.relative!r}: {exc}"
        if len(data) > MAX_SENT_FILE:
            return (
                f"{ref.relative!r} has {len(data)} bytes, over the {MAX_SENT_FILE} "
                "a file sent to a Dask worker may have: put it in depends, or on "
                "storage the workers share"
            )

        async def send() -> str:
            replies = await self.client.run(
                receive_file, self.plugin_name, ref.relative, data, workers=[node_id]
            )
            if node_id in replies:
                self.sent[node_id] += len(data)
            return str(replies.get(node_id, f"no Dask worker {node_id}"))

        try:
            return str(self.runner.run_sync(send))
        except Exception as exc:  # the worker left, the scheduler is gone
            return f"not sent to Dask worker {node_id}: {exc}"

    def running_jobs(self, node_id: str) -> list[int]:
        """Keys of the jobs known to run on a Dask worker (those running longer
        than `_daskworker.START_REPORT`)."""

        async def keys() -> list[int]:
            return sorted(self.running.get(node_id, ()))

        return self.runner.run_sync(keys)

    def node_load(self) -> dict[str, tuple[int, int]]:
        """``(cpus, jobs known to run there)`` of each Dask worker set up (Dask's
        scheduler keeps the queue, so no job waits on a worker here)."""

        async def load() -> dict[str, tuple[int, int]]:
            return {
                address: (node.cpus, len(self.running.get(address, ())))
                for address, node in self.workers.items()
            }

        return self.runner.run_sync(load)

    # -- shutdown -------------------------------------------------------------------

    def close(self, terminate: bool) -> None:
        """Cancel what is left (``terminate``), run cleanup on the workers (the
        plugin's teardown), remove the fence and close the Dask client."""
        try:
            self.runner.run_sync(self.shutdown, terminate, timeout=CLOSE_TIMEOUT)
        except (TimeoutError, DispynbError, OSError) as exc:
            logger.warning("closing the Dask computation: %s", exc)

    async def shutdown(self, terminate: bool = True) -> None:
        if self.closed:
            return
        if terminate and self.futures:
            self._cancel(list(self.futures))
            self._flush_cancels()
        self.closed = True
        client = self.client
        if client is None:
            return
        for name, unregister in (
            (self.plugin_name, client.unregister_worker_plugin),
            (self.fence_name, client.unregister_scheduler_plugin),
        ):
            with contextlib.suppress(Exception):
                await unregister(name)
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(client.id)
            client.unsubscribe_topic("all")
        with contextlib.suppress(Exception):
            await client.close()
        self.client = None


#: How a worker that cannot unpickle dispynb's plugin says so: Dask hands the client
#: the worker's exception as is, or rebuilt as a bare ``Exception`` of its repr
#: (``Exception("ModuleNotFoundError('No module named dispynb')")``).
_IMPORT_FAILURES = ("ModuleNotFoundError(", "ImportError(", "AttributeError(")


def _cannot_import(exc: BaseException) -> bool:
    """Whether the workers failed to load the plugin's classes (no dispynb there, or
    another version of it)."""
    if isinstance(exc, (ImportError, AttributeError)):
        return True
    return type(exc) is Exception and str(exc).startswith(_IMPORT_FAILURES)


def _unwrapped(exc: BaseException) -> str:
    """The worker's error in words (``ModuleNotFoundError: No module named ...``)."""
    text = str(exc)
    if type(exc) is Exception and text.endswith(")"):
        name, _, rest = text.partition("(")
        return f"{name}: {rest[:-1].strip(chr(34) + chr(39))}"
    return f"{type(exc).__name__}: {text}"
