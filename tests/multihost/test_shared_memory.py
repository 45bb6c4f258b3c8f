"""Shared memory is for nodes on the client's machine only: a node on another
(namespace) host gets large arguments over its socket; a local node beside the same
client gets them through shared memory."""

from __future__ import annotations

import pytest

from tests.multihost.conftest import Site

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

CLIENT = """
import hashlib
import os

import dispynb
from dispynb.protocol.shmpool import SegmentPool

created = []
write = SegmentPool.write


def recording(self, buffers):
    name, reference = write(self, buffers)
    created.append(name)
    return name, reference


SegmentPool.write = recording


def digest(data):
    import hashlib

    return hashlib.sha256(data).hexdigest()


def run(nodes, **options):
    payload = os.urandom(2_000_000)
    with dispynb.JobCluster(digest, nodes=nodes, **options) as cluster:
        job = cluster.submit(payload)
        result = job()
    return [result == hashlib.sha256(payload).hexdigest(), job.ip_addr, len(created)]


def main(args):
    remote = run(args["nodes"], secret=args["secret"])
    with dispynb.LocalCluster(cpus=1) as local:
        beside = run(local)
    return {"remote": remote, "local": beside}
"""


def test_node_on_another_host_gets_arguments_over_the_socket(site: Site) -> None:
    node = site.start(site.node_hosts[0])
    out = site.run_client(CLIENT, {"nodes": [node.spec], "secret": site.secret})
    assert out["remote"] == [True, site.node_hosts[0].ip, 0]  # no shared memory
    ok, _ip, created = out["local"]
    assert ok and created == 1  # the same client uses it for a node beside it
