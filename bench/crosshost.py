"""Across hosts (issue 17 item 4): W1 and W4 between network-namespace hosts, beside a
raw TCP reference measured in the same run, and the scale curve up to 16 nodes.

``run.py --cross-host`` calls `run_crosshost`, which builds the hosts the multi-host
tests use (``tests/multihost/netns.py``): ``h1``-``h4`` for nodes and ``h5`` for the
client, each a network namespace with one veth on a bridge (10.77.0.1-5). Nothing is
added to the machine's own namespace, and everything is deleted on exit, Ctrl-C or
SIGTERM included. Then, with this file run as a program in ``h5`` (mode ``main``
or ``scale``, parameters as JSON on stdin, result as JSON in the file ``out`` names):

main
    One ``dispynb-node --cpus 1`` per node host (started as a user would, the secret
    in ``DISPYNB_SECRET``); W1 and W4 of ``workloads.py`` from the client host
    through ``JobCluster(fn, nodes=[...])``; and, alternating with each W4
    repetition, the raw TCP reference: the same number of payloads of the same size
    sent with plain blocking sockets (default options, one connection and one thread
    per node host, payload ``i`` to host ``i % 4``) to a receiver on each node host
    that reads every payload and answers with its length. W4 / raw is the ratio of
    issue 17's target (at least 0.8).
shaped
    W4 and raw TCP again on the same nodes, with the client host's veth limited to
    1 Gbit/s (``tc`` token bucket), as a client with a 1 Gbit/s network card: the
    ratio where the network, not the 2 shared CPUs, is the limit.
scale
    N = 1, 2, 4, 8, 16 one-CPU node processes spread round-robin over the four node
    hosts (several per host on distinct ports): W1 jobs/s and the client's CPU per
    job, and W4 MB/s; a fresh client process per N.

Large arguments travel over TCP here: shared memory is used only for nodes on the
client's loopback (``dispynb/protocol/shm.py``), and these nodes are on other
addresses. The veth's MTU, offload sizes and the namespaces' TCP buffer sysctls are
recorded in the JSON (``link``), since veth pairs have their own defaults.

``python bench/crosshost.py w4 [REPEAT]`` (root) measures only W4 and raw TCP on
fresh hosts and prints one JSON line: for before/after runs alternated in one
sequence, from two checkouts (each run's nodes and client use its checkout).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from backends import DispynbBackend

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

#: Node hosts; the client host comes after them.
NODE_HOSTS = 4
#: Where each node host's raw TCP receiver listens.
RAW_PORT = 9800
#: Port of the first node on a host (the default port); the next ones count up.
NODE_PORT = 9711
#: Length prefix of a raw payload, and the receiver's answer (the length it read).
HEADER = struct.Struct("!Q")
#: Seconds a client program may take (per mode) before it is killed.
CLIENT_TIMEOUT = {"main": 900.0, "scale": 600.0}
#: Seconds to wait for nodes to join a cluster, or for a receiver to accept.
CONNECT_WAIT = 30.0
SCALE_COUNTS = (1, 2, 4, 8, 16)
MB = 1_000_000
#: The shaped variant: the client host's veth limited to this rate (``tc`` token
#: bucket), as a client with a 1 Gbit/s network card.
SHAPED_RATE = "1gbit"


def inc(x: int) -> int:
    """The W1 job (a ``__main__`` function, as in ``driver.py``)."""
    return x + 1


def size(data: bytes) -> int:
    """The W4 job: the payload travels, only its length comes back."""
    return len(data)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- the client host's side -----------------------------------------------------------


class RemoteDispynb(DispynbBackend):
    """`backends.DispynbBackend` on nodes given by address (other hosts) instead of a
    `LocalCluster`: one `JobCluster` per task function, used once all the nodes have
    joined it."""

    def __init__(self, addresses: Sequence[str], secret: str) -> None:
        super().__init__(len(addresses))
        self.addresses = list(addresses)
        self.secret = secret

    def start(self) -> None:
        """Nothing to start: the nodes run on their hosts."""

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["config"] = f"JobCluster(fn, nodes=[{len(self.addresses)} addresses])"
        return described

    def _cluster_options(self) -> dict[str, Any]:
        return {"nodes": self.addresses, "secret": self.secret}

    def _cluster_for(self, fn: Any) -> Any:
        fresh = self._fn is not fn
        cluster = super()._cluster_for(fn)
        deadline = time.monotonic() + CONNECT_WAIT
        while fresh and len(cluster.status().nodes) < len(self.addresses):
            if time.monotonic() > deadline:
                joined = len(cluster.status().nodes)
                raise RuntimeError(
                    f"{joined} of {len(self.addresses)} nodes joined in"
                    f" {CONNECT_WAIT} s"
                )
            time.sleep(0.05)
        return cluster


def _connect(address: tuple[str, int]) -> socket.socket:
    """A connection to a receiver, retried until it listens (bounded)."""
    deadline = time.monotonic() + CONNECT_WAIT
    while True:
        try:
            return socket.create_connection(address, timeout=CONNECT_WAIT)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the receiver closed the connection")
        data += chunk
    return bytes(data)


def raw_tcp(receivers: Sequence[tuple[str, int]], payloads: Sequence[bytes]) -> float:
    """Send ``payloads`` to the receivers (payload ``i`` to receiver ``i % n``, one
    thread per connection, all at once), wait for every answer; the elapsed seconds.

    Connections are made before the clock starts (dispynb's are, too)."""
    socks = [_connect(address) for address in receivers]
    errors: list[BaseException] = []

    def send(sock: socket.socket, share: Sequence[bytes]) -> None:
        try:
            for payload in share:
                sock.sendall(HEADER.pack(len(payload)))
                sock.sendall(payload)
            for payload in share:
                (got,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
                if got != len(payload):
                    raise ConnectionError(f"receiver read {got} of {len(payload)}")
        except BaseException as exc:
            errors.append(exc)

    count = len(socks)
    threads = [
        threading.Thread(target=send, args=(sock, payloads[i::count]), daemon=True)
        for i, sock in enumerate(socks)
    ]
    try:
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
    finally:
        for sock in socks:
            sock.close()
    if errors:
        raise errors[0]
    return elapsed


def _cpu_seconds(pids: Sequence[int]) -> tuple[float, float]:
    """User + system CPU seconds of processes ``pids`` (a node server, a raw TCP
    receiver) and of their live descendants (a node's computation process and
    workers), apart."""
    import psutil

    own = descendants = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            children = root.children(recursive=True)
        except psutil.Error:
            continue
        for proc in (root, *children):
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            if proc is root:
                own += times.user + times.system
            else:
                descendants += times.user + times.system
    return own, descendants


class CpuMeter:
    """CPU seconds of this process (all threads) and of other processes, per
    measured section: ``with meter: ...`` then `here` and `there` (`there_own`:
    the processes ``pids`` themselves, `there_descendants`: their descendants)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.here = self.there = self.there_own = self.there_descendants = 0.0

    def __enter__(self) -> CpuMeter:
        # The other processes' CPU first: reading it (psutil scans /proc for their
        # children) is not this process's cost of what is measured.
        self._there = _cpu_seconds(self.pids)
        self._here = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.here = time.process_time() - self._here
        own, descendants = _cpu_seconds(self.pids)
        self.there_own = own - self._there[0]
        self.there_descendants = descendants - self._there[1]
        self.there = self.there_own + self.there_descendants


def client_main(params: dict[str, Any]) -> dict[str, Any]:
    """Mode ``main`` or ``scale``, in the client host.

    Beside each rate, the CPU it cost: the client process (all threads) and the
    nodes' processes (server, computation process, workers), per W1 job in
    microseconds and per W4 megabyte in milliseconds (W4 also the node servers and
    their computation processes and workers apart); for raw TCP the sender (this
    process's threads) and the receivers."""
    from workloads import FULL, QUICK, Bandwidth, Throughput, fresh_payloads

    sizes = QUICK if params["quick"] else FULL
    repeat = params["repeat"]
    w1 = Throughput(fn=inc, jobs=sizes.throughput_jobs)
    w4 = Bandwidth(fn=size, jobs=sizes.bandwidth_jobs, size=sizes.bandwidth_bytes)
    megabytes = w4.jobs * w4.size / MB
    backend = RemoteDispynb(params["nodes"], os.environ["DISPYNB_SECRET"])
    nodes = CpuMeter(params.get("node_pids", []))
    result: dict[str, Any] = {}
    label = f"[cross-host {params['mode']} {len(params['nodes'])} nodes]"

    def add(key: str, value: float) -> None:
        result.setdefault(key, []).append(value)

    try:
        if not params.get("skip_w1"):
            w1.warm_up(backend)
            for rep in range(1, repeat + 1):
                with nodes:
                    rate = w1.measure(backend)["throughput"]
                add("throughput", rate)
                add("client_cpu_us_per_job", nodes.here / w1.jobs * 1e6)
                add("nodes_cpu_us_per_job", nodes.there / w1.jobs * 1e6)
                _progress(f"{label} W1 {rep}/{repeat}: {rate:,.0f} jobs/s")
        w4.warm_up(backend)
        receivers = [(ip, port) for ip, port in params.get("receivers", [])]
        raw_cpu = CpuMeter(params.get("receiver_pids", []))
        payloads = fresh_payloads(w4.jobs, w4.size)
        if receivers:
            raw_tcp(receivers, payloads)  # warm-up, as W4's
        for rep in range(1, repeat + 1):
            with nodes:
                bandwidth = w4.measure(backend)["bandwidth"]
            add("bandwidth", bandwidth)
            add("client_cpu_ms_per_mb", nodes.here / megabytes * 1e3)
            add("nodes_cpu_ms_per_mb", nodes.there / megabytes * 1e3)
            add("node_servers_cpu_ms_per_mb", nodes.there_own / megabytes * 1e3)
            add("node_workers_cpu_ms_per_mb", nodes.there_descendants / megabytes * 1e3)
            shown = f"{label} W4 {rep}/{repeat}: {bandwidth:,.0f} MB/s"
            if receivers:
                with raw_cpu:
                    raw = megabytes / raw_tcp(receivers, payloads)
                add("raw_tcp", raw)
                add("raw_sender_cpu_ms_per_mb", raw_cpu.here / megabytes * 1e3)
                add("raw_receivers_cpu_ms_per_mb", raw_cpu.there / megabytes * 1e3)
                shown += f", raw TCP {raw:,.0f} MB/s ({bandwidth / raw:.2f}x)"
            _progress(shown)
    finally:
        backend.close()
    result["nodes"] = len(params["nodes"])
    result["jobs"] = w1.jobs
    result["payloads"] = {"jobs": w4.jobs, "bytes_per_job": w4.size}
    return result


# -- a node host's raw TCP receiver ---------------------------------------------------


def receive(host: str, port: int) -> None:
    """Accept connections forever; on each, read length-prefixed payloads into one
    reused buffer and answer each with the number of bytes read."""
    server = socket.create_server((host, port), backlog=16)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()


def _serve(conn: socket.socket) -> None:
    view = memoryview(bytearray(1 << 20))
    with conn:
        while True:
            try:
                (length,) = HEADER.unpack(_recv_exact(conn, HEADER.size))
            except ConnectionError:
                return
            remaining = length
            while remaining:
                got = conn.recv_into(view[: min(remaining, len(view))])
                if not got:
                    return
                remaining -= got
            conn.sendall(HEADER.pack(length))


# -- the orchestrator (run.py's process, root) ----------------------------------------


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the namespaces are deleted either way."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def link_info(net: Any, host: Any) -> dict[str, Any]:
    """The veth's MTU, queue and offload sizes, and the TCP buffer sysctls, as seen
    in ``host`` (every host's veth is made the same way)."""
    info: dict[str, Any] = {"device": "veth0 (veth pair, bridge port on the other end)"}
    try:
        (link,) = json.loads(net.ip(host, "-j", "-d", "link", "show", "veth0"))
    except (ValueError, subprocess.SubprocessError, OSError) as exc:
        return {**info, "error": str(exc)}
    for key in (
        "mtu",
        "qdisc",
        "txqlen",
        "gso_max_size",
        "gso_max_segs",
        "gro_max_size",
        "tso_max_size",
        "num_tx_queues",
        "num_rx_queues",
    ):
        if key in link:
            info[key] = link[key]
    sysctls = {}
    for name in (
        "net/ipv4/tcp_rmem",
        "net/ipv4/tcp_wmem",
        "net/core/rmem_max",
        "net/core/wmem_max",
        "net/ipv4/tcp_congestion_control",
    ):
        done = net.run(host, ["cat", f"/proc/sys/{name}"], timeout=10)
        if done.returncode == 0:
            sysctls[name.replace("/", ".")] = done.stdout.strip()
    info["sysctl"] = sysctls
    ethtool = net.run(host, ["ethtool", "-k", "veth0"], timeout=10)
    if ethtool.returncode == 0:
        info["offload"] = {
            key.strip(): value.split()[0]
            for line in ethtool.stdout.splitlines()[1:]
            if ":" in line and not line.startswith("\t")
            for key, value in [line.split(":", 1)]
            if value.split()
        }
    else:
        info["offload"] = "not read (ethtool not installed): veth defaults"
    return info


class Hosts:
    """The namespace hosts of one run and what runs in them (`run_crosshost`)."""

    def __init__(self, net: Any, directory: Path, secret: str) -> None:
        from tests.multihost import netns

        self.netns = netns
        self.net = net
        self.directory = directory
        self.secret = secret
        self.node_hosts = net.hosts[:NODE_HOSTS]
        self.client_host = net.hosts[NODE_HOSTS]

    def start_nodes(self, count: int) -> list[Any]:
        """``count`` one-CPU ``dispynb-node`` processes, round-robin over the hosts."""
        nodes = []
        try:
            for k in range(count):
                host = self.node_hosts[k % NODE_HOSTS]
                port = NODE_PORT + k // NODE_HOSTS
                nodes.append(
                    self.netns.start_node(
                        self.net,
                        host,
                        self.directory / f"n{count}",
                        self.secret,
                        "--port",
                        str(port),
                        name=f"node-h{host.index}-{port}",
                        cpus=1,
                    )
                )
        except BaseException:
            self.stop(nodes)
            raise
        return nodes

    @staticmethod
    def stop(nodes: Sequence[Any]) -> None:
        for node in nodes:
            node.stop()

    def shape(self, rate: str | None) -> None:
        """Limit the client host's outgoing rate to ``rate`` (None: lift it)."""
        veth = ["dev", "veth0", "root"]
        if rate is None:
            command = ["tc", "qdisc", "del", *veth]
        else:
            # burst above one GSO packet (64 KiB), or the bucket never lets it out
            bucket = ["tbf", "rate", rate, "burst", "256kb", "latency", "50ms"]
            command = ["tc", "qdisc", "add", *veth, *bucket]
        done = self.net.run(self.client_host, command, timeout=20)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")

    def start_receivers(self) -> tuple[list[tuple[str, int]], list[int]]:
        """A raw TCP receiver on every node host (ended with the namespaces): their
        addresses and pids."""
        pids = []
        for host in self.node_hosts:
            proc = self.net.popen(
                host,
                [sys.executable, str(BENCH / "crosshost.py"), "receive", host.ip],
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            pids.append(proc.pid)  # `ip netns exec` execs: the receiver's own
        return [(host.ip, RAW_PORT) for host in self.node_hosts], pids

    def client(self, params: dict[str, Any]) -> dict[str, Any]:
        """Run this file's client in the client host; its JSON result."""
        env = self.netns.node_env()
        env["DISPYNB_SECRET"] = self.secret
        out = self.directory / f"client-{time.monotonic_ns()}.json"
        proc = self.net.popen(
            self.client_host,
            [sys.executable, str(BENCH / "crosshost.py")],
            stdin=subprocess.PIPE,
            stdout=sys.stderr,
            cwd=BENCH,
            env=env,
            text=True,
        )
        timeout = CLIENT_TIMEOUT[params["mode"]]
        try:
            proc.communicate(json.dumps({**params, "out": str(out)}), timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {"error": f"the {params['mode']} client timed out after {timeout} s"}
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        try:
            result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return {"error": f"the {params['mode']} client wrote no result ({exc})"}
        return result


def run_crosshost(*, quick: bool, repeat: int) -> dict[str, Any]:
    """Build the hosts, measure ``main`` then the scale curve, delete the hosts."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # tests/multihost/netns.py
    from tests.multihost import netns

    reason = netns.unavailable_reason()
    if reason:
        return {"error": reason}
    netns.sweep_stale()
    counts = [1, 2] if quick else list(SCALE_COUNTS)
    result: dict[str, Any] = {
        "params": {
            "node_hosts": NODE_HOSTS,
            "cpus_per_node": 1,
            "repeat": repeat,
            "quick": quick,
            "scale_counts": counts,
        }
    }
    net = netns.Network(NODE_HOSTS + 1)
    with (
        _sigterm_as_interrupt(),
        tempfile.TemporaryDirectory(prefix="bench-crosshost-") as tmp,
        net.running(),
    ):
        secret, _ = netns.new_secret_file(Path(tmp))
        hosts = Hosts(net, Path(tmp), secret)
        result["link"] = link_info(net, hosts.node_hosts[0])
        _progress(f"[cross-host] link: {result['link']}")
        receivers, receiver_pids = hosts.start_receivers()
        base = {"quick": quick, "repeat": repeat}
        nodes = hosts.start_nodes(NODE_HOSTS)
        try:
            specs = [node.spec for node in nodes]
            measured = {
                "nodes": specs,
                "node_pids": [node.proc.pid for node in nodes],
                "receivers": receivers,
                "receiver_pids": receiver_pids,
            }
            main = hosts.client({**base, "mode": "main", **measured})
            if "error" not in main:
                hosts.shape(SHAPED_RATE)
                shaped = hosts.client(
                    {**base, "mode": "main", **measured, "skip_w1": True}
                )
                hosts.shape(None)
                shaped["rate"] = SHAPED_RATE
                result["shaped"] = shaped
                if "error" in shaped:
                    main["error"] = f"shaped to {SHAPED_RATE}: {shaped.pop('error')}"
        finally:
            hosts.stop(nodes)
        if "error" in main:
            result["error"] = main.pop("error")
        result["main"] = main
        result["scale"] = []
        for count in counts:
            if "error" in result:
                break
            nodes = hosts.start_nodes(count)
            try:
                row = hosts.client(
                    {
                        **base,
                        "mode": "scale",
                        "nodes": [n.spec for n in nodes],
                        "node_pids": [n.proc.pid for n in nodes],
                    }
                )
            finally:
                hosts.stop(nodes)
            if "error" in row:
                result["error"] = f"{count} nodes: {row.pop('error')}"
            else:
                row["hosts"] = min(count, NODE_HOSTS)
                result["scale"].append(row)
                _progress(
                    f"[cross-host] scale {count} nodes:"
                    f" {statistics.median(row['throughput']):,.0f} jobs/s,"
                    f" {statistics.median(row['bandwidth']):,.0f} MB/s"
                )
    return result


def run_w4(repeat: int) -> dict[str, Any]:
    """W4 and raw TCP only (mode ``main`` without W1), on fresh hosts and nodes:
    for before/after runs alternated in one sequence, where only these rows and
    their CPU per MB matter."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # tests/multihost/netns.py
    from tests.multihost import netns

    reason = netns.unavailable_reason()
    if reason:
        return {"error": reason}
    net = netns.Network(NODE_HOSTS + 1)
    with (
        _sigterm_as_interrupt(),
        tempfile.TemporaryDirectory(prefix="bench-crosshost-") as tmp,
        net.running(),
    ):
        secret, _ = netns.new_secret_file(Path(tmp))
        hosts = Hosts(net, Path(tmp), secret)
        receivers, receiver_pids = hosts.start_receivers()
        nodes = hosts.start_nodes(NODE_HOSTS)
        try:
            return hosts.client(
                {
                    "quick": False,
                    "repeat": repeat,
                    "mode": "main",
                    "skip_w1": True,
                    "nodes": [node.spec for node in nodes],
                    "node_pids": [node.proc.pid for node in nodes],
                    "receivers": receivers,
                    "receiver_pids": receiver_pids,
                }
            )
        finally:
            hosts.stop(nodes)


def _w4_summary(result: dict[str, Any]) -> dict[str, Any]:
    """One line of `run_w4`'s figures: rates, ratio of the medians, and the mean
    CPU per MB of each side over the repetitions."""
    if "error" in result:
        return {"error": result["error"]}
    median, mean = statistics.median, statistics.mean
    out: dict[str, Any] = {
        "load": [round(x, 1) for x in os.getloadavg()],
        "w4": [round(x) for x in result["bandwidth"]],
        "raw_tcp": [round(x) for x in result["raw_tcp"]],
        "ratio": round(median(result["bandwidth"]) / median(result["raw_tcp"]), 2),
    }
    for key in (
        "client_cpu_ms_per_mb",
        "node_servers_cpu_ms_per_mb",
        "node_workers_cpu_ms_per_mb",
        "raw_sender_cpu_ms_per_mb",
        "raw_receivers_cpu_ms_per_mb",
    ):
        out[key] = round(mean(result[key]), 3)
    return out


def main(argv: Sequence[str]) -> int:
    """``crosshost.py receive IP`` (a receiver); ``crosshost.py w4 [REPEAT]`` (W4
    and raw TCP only, a JSON line: needs root); or a client reading JSON on stdin."""
    if argv[:1] == ["receive"]:
        receive(argv[1], RAW_PORT)
        return 0
    if argv[:1] in (["-h"], ["--help"]) or (not argv and sys.stdin.isatty()):
        print(__doc__)
        return 0
    if argv[:1] == ["w4"]:
        summary = _w4_summary(run_w4(int(argv[1]) if len(argv) > 1 else 10))
        print(json.dumps(summary), flush=True)
        return 1 if "error" in summary else 0
    params = json.loads(sys.stdin.read())
    try:
        result = client_main(params)
        status = 0
    except BaseException as exc:
        import traceback

        result = {"error": "".join(traceback.format_exception(exc))[-4000:]}
        status = 1
    Path(params["out"]).write_text(json.dumps(result), encoding="utf-8")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
