"""A small TCP "toxic proxy" on 127.0.0.1 for slow-link tests (toxiproxy-style).

`ToxicProxy` listens on 127.0.0.1 (port 0) and forwards every accepted connection to
one upstream address, on an asyncio loop in a thread of its own. Each direction has
its `Toxics`: latency with jitter (byte order is kept), slicing into N-byte writes
with a pause between them, and a bandwidth limit. `blackhole` stops forwarding in
both directions without closing anything (the bytes wait in the proxy, as a TCP
sender would retransmit them); `heal` lets them through again.

The kernel here has no netem qdisc, hence this proxy; it only ever talks to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from dataclasses import dataclass

#: Bytes read from a socket at a time.
READ_SIZE = 64 * 1024

#: Seconds `ToxicProxy.start` and `ToxicProxy.stop` wait for the proxy's loop.
LOOP_WAIT = 10.0


@dataclass(frozen=True)
class Toxics:
    """What happens to the bytes flowing one way (all off by default).

    ``latency`` and ``jitter`` (seconds): each chunk read is held for
    ``latency + uniform(-jitter, jitter)`` s, but never passes the chunk before it.
    ``slice_size`` (bytes) and ``slice_pause`` (seconds): write at most that many
    bytes at a time, pausing between writes. ``rate`` (bytes/s): bandwidth limit.
    """

    latency: float = 0.0
    jitter: float = 0.0
    slice_size: int | None = None
    slice_pause: float = 0.0
    rate: float | None = None

    def __post_init__(self) -> None:
        if self.latency < 0 or self.jitter < 0 or self.jitter > self.latency:
            raise ValueError(
                f"need 0 <= jitter <= latency, got latency={self.latency} "
                f"jitter={self.jitter}"
            )
        if self.slice_size is not None and self.slice_size < 1:
            raise ValueError(f"slice_size must be >= 1 byte, got {self.slice_size}")
        if self.slice_pause < 0:
            raise ValueError(f"slice_pause must be >= 0, got {self.slice_pause}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be > 0 bytes/s, got {self.rate}")

    def delay(self) -> float:
        """Seconds to hold the next chunk."""
        if not self.jitter:
            return self.latency
        return self.latency + random.uniform(-self.jitter, self.jitter)


@dataclass
class Stats:
    """What one direction forwarded (updated on the proxy's loop)."""

    bytes: int = 0
    writes: int = 0
    max_write: int = 0

    def record(self, size: int) -> None:
        self.bytes += size
        self.writes += 1
        self.max_write = max(self.max_write, size)


class ToxicProxy:
    """Forward 127.0.0.1:`port` to ``upstream`` through `Toxics` (a context manager).

    ``upstream`` toxics apply to bytes from the client to the upstream server,
    ``downstream`` to bytes coming back.
    """

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        upstream: Toxics | None = None,
        downstream: Toxics | None = None,
    ) -> None:
        self.upstream_addr = (upstream_host, upstream_port)
        self.toxics = {"up": upstream or Toxics(), "down": downstream or Toxics()}
        self.stats = {"up": Stats(), "down": Stats()}
        self.connections = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._heal_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def spec(self) -> str:
        """``host:port`` of the proxy, as a node spec for `JobCluster`."""
        return f"127.0.0.1:{self.port}"

    # -- control (any thread) --------------------------------------------------

    def set_toxics(
        self, *, upstream: Toxics | None = None, downstream: Toxics | None = None
    ) -> None:
        """Replace the toxics of one or both directions (applies to the next chunk)."""
        if upstream is not None:
            self.toxics["up"] = upstream
        if downstream is not None:
            self.toxics["down"] = downstream

    def blackhole(self, seconds: float | None = None) -> None:
        """Stop forwarding both ways, closing nothing; heal after ``seconds`` if set."""
        self._call(self._blackhole, seconds)

    def heal(self) -> None:
        """Forward again, the held bytes first."""
        self._call(self._heal)

    def start(self) -> ToxicProxy:
        """Listen (on a new thread's loop); return once `port` is known."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._thread = threading.Thread(target=run, name="toxic-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(LOOP_WAIT):
            raise RuntimeError(f"toxic proxy did not start within {LOOP_WAIT} s")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every forwarded connection; join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(LOOP_WAIT)
        if thread.is_alive():
            raise RuntimeError(f"toxic proxy did not stop within {LOOP_WAIT} s")

    def __enter__(self) -> ToxicProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _call(self, func: object, *args: object) -> None:
        if self._loop is None:
            raise RuntimeError("the toxic proxy is not started: call start() first")
        self._loop.call_soon_threadsafe(func, *args)  # type: ignore[arg-type]

    # -- on the proxy's loop ---------------------------------------------------

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _blackhole(self, seconds: float | None) -> None:
        assert self._flowing is not None and self._loop is not None
        self._flowing.clear()
        if self._heal_handle is not None:
            self._heal_handle.cancel()
        if seconds is not None:
            self._heal_handle = self._loop.call_later(seconds, self._heal)

    def _heal(self) -> None:
        assert self._flowing is not None
        self._heal_handle = None
        self._flowing.set()

    async def _accept(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        accepting = asyncio.current_task()
        assert accepting is not None
        self._tasks.add(accepting)  # cancelled by _shutdown like the pumps
        self._writers.add(client_w)
        node_w: asyncio.StreamWriter | None = None
        try:
            node_r, node_w = await asyncio.open_connection(*self.upstream_addr)
            self._writers.add(node_w)
            pumps = [
                asyncio.ensure_future(self._pump(client_r, node_w, "up")),
                asyncio.ensure_future(self._pump(node_r, client_w, "down")),
            ]
            try:
                await asyncio.gather(*pumps)
            finally:
                for task in pumps:
                    task.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except OSError:
            pass  # upstream refused or reset: the client sees its side close
        except asyncio.CancelledError:
            # _shutdown: end normally, as Python 3.11's stream callback calls
            # exception() on this task and would log a cancelled one as an error
            pass
        finally:
            for writer in (client_w, node_w):
                if writer is not None:
                    writer.close()
                    self._writers.discard(writer)
            self._tasks.discard(accepting)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, way: str
    ) -> None:
        """Forward one direction: a reader stamps chunks with their due time, this
        task writes them in order (so latency does not cut the throughput)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def read() -> None:
            last_due = 0.0
            try:
                while chunk := await reader.read(READ_SIZE):
                    # jitter never reorders: a chunk is due no earlier than the last
                    last_due = max(last_due, loop.time() + self.toxics[way].delay())
                    queue.put_nowait((last_due, chunk))
            except OSError:
                pass
            queue.put_nowait((0.0, b""))  # end of stream

        reading = asyncio.ensure_future(read())
        try:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    assert self._flowing is not None
                    await self._flowing.wait()  # a blackhole holds the close too
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                await asyncio.sleep(max(0.0, due - loop.time()))
                await self._write(writer, chunk, way)
        except OSError:
            # the destination is gone: close it, so the other way's reader ends too
            writer.close()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading

    async def _write(
        self, writer: asyncio.StreamWriter, chunk: bytes, way: str
    ) -> None:
        """Write ``chunk`` through the slicer, the rate limit and the blackhole."""
        assert self._flowing is not None
        view = memoryview(chunk)
        while view:
            await self._flowing.wait()
            toxics = self.toxics[way]
            size = toxics.slice_size or len(view)
            if toxics.rate is not None:
                # about 20 writes a second: smooth enough, and cheap
                size = min(size, max(1, int(toxics.rate / 20)))
            piece, view = view[:size], view[size:]
            started = time.monotonic()
            writer.write(bytes(piece))
            await writer.drain()
            self.stats[way].record(len(piece))
            pause = toxics.slice_pause if toxics.slice_size and view else 0.0
            if toxics.rate is not None:
                pause = max(
                    pause, len(piece) / toxics.rate - (time.monotonic() - started)
                )
            if pause > 0 or toxics.slice_size:
                # sleep(0) still yields: the other direction flows between slices
                await asyncio.sleep(max(0.0, pause))

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
