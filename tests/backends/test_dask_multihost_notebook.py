"""A notebook on a multi-host Dask cluster under nbval: ``%dispy dask tcp://HOST:8786``.

``dask scheduler`` on h1, ``dask worker`` on h2 and h3 (namespace hosts on one
bridge), the kernel on h4: the notebook connects with ``%dispy dask ADDRESS`` as a
user types it, runs ``%%dispy`` over both worker hosts, pins a run to one host with
``--on``, gets files back from jobs with ``dispy_send_file`` (they cross hosts), runs
a program computation, and closes. Each cell checks what it got (nbval fails the
test on any error).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends.daskhosts import DaskCluster, dask_cluster
from tests.multihost.netns import Network, hosts_or_skip
from tests.nodeproc import ROOT, node_env

pytestmark = [
    pytest.mark.multihost,
    pytest.mark.slow,
    pytest.mark.notebook,
    pytest.mark.timeout(240),
]

pytest.importorskip("distributed")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbval")


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    """h1: scheduler, h2 and h3: workers, h4: the notebook's kernel."""
    with hosts_or_skip(4) as network:
        yield network


@pytest.fixture
def cluster(net: Network, tmp_path: Path) -> Iterator[DaskCluster]:
    hosts = net.hosts
    with dask_cluster(net, hosts[0], hosts[1:3], tmp_path / "dask") as started:
        yield started


def cells(scheduler: str) -> list[str]:
    """The notebook's code cells (each checks what it got)."""
    return [
        f"%load_ext dispynb\n%dispy dask {scheduler}",
        '%%dispy --over "range(6)" --into spread\n'
        "def where(x):\n"
        "    print('on', dispy_node_ip_addr)\n"
        "    return dispy_node_ip_addr",
        'assert set(spread.results) == {"10.77.0.2", "10.77.0.3"}, spread.results\n'
        'assert spread.df.stdout.tolist() == [f"on {ip}\\n" for ip in spread.results]',
        '%%dispy --over "range(4)" --on 10.77.0.3 --into pinned --progress none\n'
        "def where_pinned(x):\n"
        "    return dispy_node_ip_addr",
        'assert pinned.results == ["10.77.0.3"] * 4, pinned.results',
        '%%dispy --over "range(3)" --into reports --progress none\n'
        "def report(n):\n"
        '    name = f"report-{n}.txt"\n'
        '    with open(name, "w") as out:\n'
        '        out.write(f"report {n} from {dispy_node_ip_addr}")\n'
        "    assert dispy_send_file(name) == 0\n"
        "    return [name, dispy_node_ip_addr]",
        "from pathlib import Path\n"
        "for name, ip in reports.results:\n"
        '    assert Path(name).read_text() == f"report {name[7]} from {ip}"',
        "import os\n"
        "from dispynb import Run\n"
        "from dispynb.backends.dask import DaskEngine\n"
        'with open("count_words.sh", "w") as out:\n'
        '    out.write(\'#!/bin/sh\\necho "$# words on $dispy_node_ip_addr"\\n'
        'test "$#" -lt 3\\n\')\n'
        'os.chmod("count_words.sh", 0o755)\n'
        "counted = Run.map(\n"
        '    "count_words.sh", [("one",), ("one", "two", "three")],\n'
        f'    engine=DaskEngine("{scheduler}"), unpack=True, progress="none",\n'
        ")\n"
        "assert counted.results == [0, 1], counted.results\n"
        "outputs = list(counted.df.stdout)  # the program's bytes, decoded\n"
        'assert outputs[0].startswith("1 words on 10.77.0."), outputs\n'
        'assert outputs[1].startswith("3 words on 10.77.0."), outputs',
        "status = %dispy status\n"
        f'assert "dask engine: {scheduler}" in repr(status), repr(status)\n'
        "%dispy close",
    ]


def test_a_notebook_on_a_multihost_dask_cluster(
    net: Network, cluster: DaskCluster, tmp_path: Path
) -> None:
    """``%dispy dask tcp://10.77.0.1:8786`` in a notebook run by nbval on h4."""
    home = tmp_path / "notebook"
    home.mkdir()
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(c) for c in cells(cluster.address)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    path = home / "dask-hosts.ipynb"
    nbformat.write(notebook, str(path))
    argv = [
        sys.executable, "-m", "pytest", str(path), "-q", "-p", "no:cacheprovider",
        "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(home),
    ]  # fmt: skip
    done = subprocess.run(
        net.hosts[3].command(argv),
        env=node_env(),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "9 passed" in done.stdout
    for n in range(3):
        assert (home / f"report-{n}.txt").read_text().startswith(f"report {n} from")
