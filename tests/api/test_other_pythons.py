"""dispynb on the other Python versions it supports (``requires-python >=3.11``),
where this suite's venv has one: a node and a client on Python 3.12 and 3.13, over
TLS with a lab CA's certificates, and this Python's client refused by that node
with the reason.

Each version runs from ``.venv-py3.12`` / ``.venv-py3.13`` beside the checkout,
which ``./dev test`` makes (dispynb's dependencies only) when pyenv has that Python;
without it the test is skipped and says so. What broke on 3.13 before: a CA made by
``openssl req -x509`` (no key usage extension) was refused by 3.13's stricter
certificate checks. On 3.12.0 and 3.12.1 (which start no thread at interpreter
exit): a script that left its clusters open, whose results came as it exited.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dispynb import JobCluster
from dispynb.errors import DispynbError, SetupError
from tests.nodeproc import ROOT, node_env, running_node
from tests.transport.certs import day_certificate, write_pem

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

#: Put before `tests.nodeproc.node_command` (``python -m nodeserver ARGS``): runs
#: the node with the other Python instead.
RUN_NODE = (
    "import runpy, sys; sys.argv = ['nodeserver', *sys.argv[4:]]; "
    "runpy.run_module('nodeserver', run_name='__main__', alter_sys=True)"
)

#: The client, run by the other Python: a function of its own (compiled code,
#: which only the same version runs) and one that travels by name.
CLIENT = """
import math, sys
from dispynb import JobCluster

def cube(x):
    return x ** 3

node, secret, ca, cert, key = sys.argv[1:]
for compute, arg in ((cube, 3), (math.factorial, 5)):
    with JobCluster(compute, nodes=[node], secret=secret, cafile=ca,
                    certfile=cert, keyfile=key) as cluster:
        print(cluster.submit(arg)())
"""


def other_python(version: str) -> Path:
    python = ROOT / f".venv-py{version}" / "bin" / "python"
    if not python.exists():
        pytest.skip(
            f"no Python {version} venv ({python.parent.parent}): ./dev test makes "
            f"it when pyenv has a Python {version}"
        )
    return python


def lab_ca(directory: Path) -> tuple[str, str, str, str, str]:
    """A lab CA as ``openssl req -x509`` makes it (basic constraints, no key usage)
    and a certificate for 127.0.0.1 it signed; their paths: ca.pem, node.pem,
    node.key, client.pem, client.key."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab-dispynb-ca")])
    ca = (
        day_certificate(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = [write_pem(directory, "ca", ca, ca_key)[0]]
    for name in ("node", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            day_certificate(subject, ca_name, key.public_key())
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        paths += write_pem(directory, name, cert, key)
    return paths[0], paths[1], paths[2], paths[3], paths[4]


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_a_node_and_a_client_on_another_python_run_jobs_over_tls(
    version: str, tmp_path: Path
) -> None:
    ours = "{}.{}".format(*sys.version_info[:2])
    if version == ours:
        pytest.skip(f"this suite runs on Python {ours}: no other Python to test")
    python = other_python(version)
    ca, node_cert, node_key, client_cert, client_key = lab_ca(tmp_path)
    tls = ("--certfile", node_cert, "--keyfile", node_key, "--cafile", ca)
    with running_node(
        tmp_path / "node", *tls, launcher=[str(python), "-c", RUN_NODE]
    ) as node:
        ran = subprocess.run(
            [str(python), "-c", CLIENT, node.spec, node.secret, ca, client_cert,
             client_key],
            capture_output=True, text=True, cwd=tmp_path, env=node_env(), timeout=45,
        )  # fmt: skip
        assert ran.stdout.split() == ["27", "120"], ran.stderr + node.log_text()
        assert "with TLS" in node.log_text()

        # This Python's client: its function is compiled code the node cannot run.
        with pytest.raises(SetupError) as raised:
            JobCluster(
                _square,
                nodes=[node.spec],
                secret=node.secret,
                cafile=ca,
                certfile=client_cert,
                keyfile=client_key,
            )
        assert f"runs Python {version}." in str(raised.value)
        assert f"start dispynb-node with a Python {ours}" in str(raised.value)


def _square(x: int) -> int:
    return x * x


def test_a_notebooks_nodes_of_another_python_are_refused_in_its_words(
    tmp_path: Path,
) -> None:
    """``%dispy nodes`` at a node of another Python said 'the computation
    _dispynb_node_probe, defined in this program, travels as compiled code': a
    function the person never wrote. It says the notebook's functions do."""
    from IPython.core.error import UsageError

    from dispynb.jupyter.probing import _dispynb_node_probe
    from dispynb.protocol.serialize import travels_by_value
    from tests.jupyter.shell import dispynb_shell

    if not travels_by_value(_dispynb_node_probe):  # dispynb installed, not a checkout
        pytest.skip("the nodes are checked at the first run, not by %dispy nodes")
    ours = "{}.{}".format(*sys.version_info[:2])
    version = "3.13" if ours == "3.12" else "3.12"
    python = other_python(version)
    with (
        running_node(tmp_path / "node", launcher=[str(python), "-c", RUN_NODE]) as node,
        dispynb_shell() as shell,
        pytest.raises((UsageError, DispynbError)) as raised,
    ):
        shell.run_line_magic(
            "dispy", f"nodes {node.spec} --secret-file {node.secret_file}"
        )
    said = str(raised.value)
    assert "_dispynb_node_probe" not in said, said
    assert (
        f"and this notebook's kernel Python {ours}: the functions of a notebook "
        in said
    )
    assert said.endswith(
        f"Start dispynb-node there with a Python {ours}, or use a kernel of Python "
        f"{version}"
    ), said


#: A script that leaves its clusters open, as dispy's users do: dispynb waits for
#: their jobs at interpreter exit (each job waits for a file the script writes
#: then). One cluster's callback prints the results and submits more, the other's
#: job has a future whose done callback prints; a third's job ends as the main
#: thread ends, while Python waits for a thread that waits for its callback.
LEFT_OPEN = """
import atexit, os, sys, threading, time
from dispynb import JobCluster

def cube(x, go):
    import os, time
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x, x ** 3

def job_status(job):
    if job.status == job.Finished:
        n, cubed = job.result
        print(n, cubed, flush=True)
        if n < 3:
            cluster.submit(n + 3, at_exit)

node, secret, directory = sys.argv[1:]
main_ended, at_exit = (os.path.join(directory, f) for f in ("main-ended", "at-exit"))
cluster = JobCluster(cube, nodes=[node], secret=secret, job_status=job_status)
for n in range(3):
    cluster.submit(n, at_exit)
plain = JobCluster(cube, nodes=[node], secret=secret)
plain.submit(6, at_exit).future.add_done_callback(lambda f: print(*f.result()))
heard = threading.Event()
early = JobCluster(cube, nodes=[node], secret=secret,
                   job_status=lambda job: job.status == job.Finished and heard.set())
early.submit(7, main_ended)

def after_main():  # a thread Python waits for as the main thread ends
    threading.main_thread().join()
    open(main_ended, "w").close()
    print("heard" if heard.wait(20) else "not heard", flush=True)

threading.Thread(target=after_main).start()
atexit.register(lambda: open(at_exit, "w").close())  # runs before dispynb's wait
"""


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_a_script_left_open_gets_its_results_at_exit_on_another_python(
    version: str, tmp_path: Path
) -> None:
    """Python 3.12.0 and 3.12.1 start no thread once the main thread has ended
    (3.12.2 does again): there the first result posted to the callback thread
    raised in the I/O thread, the node was dropped and the exit waited for ever
    for its jobs; the last cluster's close printed ``RuntimeError: can't create
    new thread at interpreter shutdown``. Caught where ``.venv-py3.12`` runs one
    of those versions."""
    python = other_python(version)
    with running_node(
        tmp_path / "node", cpus=6, launcher=[str(python), "-c", RUN_NODE]
    ) as node:
        ran = subprocess.run(
            [str(python), "-c", LEFT_OPEN, node.spec, node.secret, str(tmp_path)],
            capture_output=True, text=True, cwd=tmp_path, env=node_env(), timeout=50,
        )  # fmt: skip
        logs = ran.stderr + node.log_text()
    assert sorted(ran.stdout.splitlines()) == sorted(
        [f"{n} {n**3}" for n in range(7)] + ["heard"]
    ), logs
    assert (ran.returncode, ran.stderr) == (0, ""), logs


#: Executors a thread leaves as the interpreter exits: one shut down without
#: waiting, one dropped unshut.
EXECUTORS_AT_EXIT = """
import threading
from dispynb import Executor

made = threading.Event()

def worker():
    waited, dropped = Executor(max_workers=1), Executor(max_workers=1)
    print(waited.submit(abs, -3).result(), dropped.submit(abs, -4).result())
    made.set()
    threading.main_thread().join()  # Python now waits for this thread
    waited.shutdown(wait=False)
    del dropped

if __name__ == "__main__":
    threading.Thread(target=worker).start()
    made.wait(30)
"""


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_executors_shut_down_or_dropped_as_a_script_exits_on_another_python(
    version: str, tmp_path: Path
) -> None:
    """On 3.12.0 and 3.12.1 ``shutdown(wait=False)`` raised ``RuntimeError: can't
    create new thread at interpreter shutdown`` and the dropped executor's
    finalizer printed it."""
    python = other_python(version)
    script = tmp_path / "script.py"
    script.write_text(EXECUTORS_AT_EXIT)
    ran = subprocess.run(
        [str(python), str(script)],
        capture_output=True, text=True, cwd=tmp_path, env=node_env(), timeout=50,
    )  # fmt: skip
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "3 4\n", "")


#: A run nobody waits for (``Run.map(wait=False)``), its bar drawn by the callback
#: thread (`Run.live`), whose jobs end as the script exits.
RUN_LEFT = """
import atexit, sys
from dispynb.jupyter import Run

def cube(x, go):
    import os, time
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x ** 3

node, secret, go = sys.argv[1:]
run = Run.map(cube, [(n, go) for n in range(30)], unpack=True, nodes=[node],
              secret=secret, wait=False, progress="text")
run.live(run.bar)
atexit.register(lambda: open(go, "w").close())  # runs before dispynb's wait
"""


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_a_run_left_to_itself_ends_as_a_script_exits_on_another_python(
    version: str, tmp_path: Path
) -> None:
    """On 3.12.0 and 3.12.1 its bar's timer (drawing a burst of results at most so
    often) and the thread that closes its cluster did not start: two tracebacks."""
    python = other_python(version)
    with running_node(
        tmp_path / "node", cpus=2, launcher=[str(python), "-c", RUN_NODE]
    ) as node:
        ran = subprocess.run(
            [str(python), "-c", RUN_LEFT, node.spec, node.secret, str(tmp_path / "go")],
            capture_output=True, text=True, cwd=tmp_path, env=node_env(), timeout=50,
        )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "Traceback" not in ran.stderr, ran.stderr
    assert (
        ran.stderr.rstrip()
        .splitlines()[-1]
        .startswith(
            "cube [##############################] 30/30 done, 0 running, 0 queued"
        )
    ), ran.stderr
