"""Tests of `dispynb.node`: node views, `NodeAllocate` and ``nodes=`` specs."""

from __future__ import annotations

import socket

import pytest

from dispynb.errors import ConfigurationError
from dispynb.node import (
    DispyNode,
    DispyNodeAvailInfo,
    NodeAllocate,
    NodeStatus,
    is_wildcard,
    parse_node_specs,
)


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record name lookups and answer them without DNS: 'node-a' is 10.1.1.1."""
    calls: list[str] = []

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        calls.append(host)
        if host == "node-a":
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::1", 0, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.1.1", 0)),
            ]
        if host == "v6-only":
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00:0::2", 0, 0, 0)),
            ]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


class FakeCluster:
    name = "fake"


# -- DispyNode, DispyNodeAvailInfo ----------------------------------------------------


def test_node_status_values_match_dispy():
    assert (DispyNode.Initialized, DispyNode.Closed, DispyNode.AvailInfo) == (
        4,
        16,
        17,
    )
    assert DispyNode.Initialized is NodeStatus.Initialized


def test_dispy_node_new_has_dispy_attributes():
    node = DispyNode("10.0.0.1", "n1", 4, port=9711, platform="Linux-6")
    assert (node.ip_addr, node.port, node.name) == ("10.0.0.1", 9711, "n1")
    assert (node.cpus, node.avail_cpus, node.busy, node.jobs_done) == (4, 4, 0, 0)
    assert (node.cpu_time, node.tx, node.rx) == (0.0, 0, 0)
    assert node.update_time > 0
    assert node.avail_info is None
    assert node.platform == "Linux-6"


def test_dispy_node_repr_shows_address_and_cpus():
    node = DispyNode("10.0.0.1", "n1", 4, port=9711)
    assert repr(node) == "<DispyNode 10.0.0.1:9711 name='n1' cpus=4 busy=0>"


def test_avail_info_new_keeps_fields():
    info = DispyNodeAvailInfo(cpu=75.0, memory=2**30, disk=2**33, swap=50.0)
    assert (info.cpu, info.memory, info.disk, info.swap) == (75.0, 2**30, 2**33, 50.0)
    assert "cpu=75.0%" in repr(info)


# -- NodeAllocate construction --------------------------------------------------------


def test_allocate_spec_wildcard_keeps_host_and_builds_regex(lookups):
    spec = NodeAllocate("192.168.1.*")
    assert spec.host == spec.ip_addr == "192.168.1.*"
    assert spec.ip_rex == r"192\.168\.1\..*"
    assert (spec.port, spec.cpus, spec.depends, spec.setup_args) == (None, 0, [], ())
    assert spec.resolve() == "192.168.1.*"
    assert lookups == []


def test_allocate_spec_keyword_host_as_in_dispy_examples():
    assert NodeAllocate(host="*").ip_rex == ".*"


def test_allocate_spec_ip_address_is_canonical_without_lookup(lookups):
    spec = NodeAllocate("0:0:0:0:0:0:0:1")
    assert spec.ip_addr == "::1"
    assert spec.host == "0:0:0:0:0:0:0:1"
    assert spec.port is None
    assert lookups == []


def test_allocate_spec_host_name_resolves_lazily_preferring_ipv4(lookups):
    spec = NodeAllocate("node-a")
    assert lookups == []
    assert spec.ip_rex == "node\\-a"
    assert spec.ip_addr == "10.1.1.1"
    assert spec.ip_addr == "10.1.1.1"
    assert lookups == ["node-a"]


def test_allocate_spec_ipv6_only_name_resolves_to_canonical_address(lookups):
    assert NodeAllocate("v6-only").resolve() == "fd00::2"


def test_allocate_spec_unknown_name_resolves_to_none_and_keeps_host(lookups):
    spec = NodeAllocate("no-such-host")
    assert spec.resolve() is None
    assert spec.ip_addr == "no-such-host"


def test_allocate_spec_host_with_port_splits_port():
    spec = NodeAllocate("10.0.0.1:9800")
    assert (spec.host, spec.ip_addr, spec.port) == ("10.0.0.1", "10.0.0.1", 9800)


def test_allocate_spec_bracketed_ipv6_with_port_splits_port():
    spec = NodeAllocate("[::1]:9800")
    assert (spec.host, spec.ip_addr, spec.port) == ("::1", "::1", 9800)


def test_allocate_spec_bracketed_ipv6_without_port_has_no_port():
    spec = NodeAllocate("[fe80::1%eth0]")
    assert (spec.host, spec.ip_addr, spec.port) == ("fe80::1%eth0", "fe80::1", None)


def test_allocate_spec_bare_ipv6_is_not_split():
    spec = NodeAllocate("fd00::5")
    assert (spec.host, spec.port) == ("fd00::5", None)


def test_allocate_spec_same_port_twice_is_accepted():
    assert NodeAllocate("10.0.0.1:9800", port="9800").port == 9800


@pytest.mark.parametrize(
    ("host", "port", "match"),
    [
        ("", None, "non-empty string"),
        (None, None, "non-empty string"),
        (("10.0.0.1",), None, "non-empty string"),
        ("[::1", None, r"'\[::1\]:9711'"),
        ("[::1]9800", None, r"'\[::1\]:9711'"),
        (":9800", None, "no host before the port"),
        ("10.0.0.1:http", None, "1 to 65535"),
        ("10.0.0.1:9800", 9801, "give the port once"),
        ("10.0.0.1", 0, "1 to 65535"),
        ("10.0.0.1", 70000, "1 to 65535"),
        ("10.0.0.1", True, "1 to 65535"),
        ("10.0.0.1", 9.5, "1 to 65535"),
    ],
)
def test_allocate_spec_bad_host_or_port_raises_configuration_error(host, port, match):
    with pytest.raises(ConfigurationError, match=match):
        NodeAllocate(host, port=port)


def test_allocate_spec_string_cpus_converted_like_dispy():
    assert NodeAllocate("*", cpus="2").cpus == 2


@pytest.mark.parametrize("cpus", ["two", 1.5, None, True])
def test_allocate_spec_bad_cpus_raises_configuration_error(cpus):
    with pytest.raises(ConfigurationError, match="cpus of node '\\*' must be an int"):
        NodeAllocate("*", cpus=cpus)


def test_allocate_spec_default_depends_is_not_shared():
    first, second = NodeAllocate("*"), NodeAllocate("*")
    first.depends.append("data.csv")
    assert second.depends == []
    assert NodeAllocate("*").depends == []


def test_allocate_spec_given_depends_is_copied():
    depends = ["a.py"]
    spec = NodeAllocate("*", depends=depends)
    spec.depends.append("b.py")
    assert depends == ["a.py"]
    assert NodeAllocate("*", depends=("a.py",)).depends == ["a.py"]


def test_allocate_spec_depends_string_raises_configuration_error():
    with pytest.raises(ConfigurationError, match=r"depends=\['data.csv'\]"):
        NodeAllocate("*", depends="data.csv")  # type: ignore[arg-type]


def test_allocate_spec_setup_args_list_converted_to_tuple():
    assert NodeAllocate("*", setup_args=[1, 2]).setup_args == (1, 2)


@pytest.mark.parametrize("setup_args", ["data.csv", 5, None, {"a": 1}])
def test_allocate_spec_bad_setup_args_raises_configuration_error(setup_args):
    with pytest.raises(ConfigurationError, match=r"setup_args=\(value,\)"):
        NodeAllocate("*", setup_args=setup_args)


def test_allocate_spec_repr_shows_host_port_and_cpus():
    assert repr(NodeAllocate("[::1]:9800", cpus=2)) == (
        "<NodeAllocate '::1' port=9800 cpus=2>"
    )


# -- NodeAllocate.allocate ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec_cpus", "node_cpus", "expected"),
    [
        (0, 8, 8),
        (2, 8, 2),
        (16, 8, 8),
        (-2, 8, 6),
        (-8, 8, 0),
        (-10, 8, 0),
    ],
)
def test_allocate_cpus_limit_returns_expected_cpus(spec_cpus, node_cpus, expected):
    spec = NodeAllocate("*", cpus=spec_cpus)
    assert spec.allocate(FakeCluster(), "10.0.0.1", "n1", node_cpus) == expected


@pytest.mark.parametrize(
    ("host", "ip_addr", "name", "matches"),
    [
        ("*", "10.0.0.1", "", True),
        ("192.168.1.*", "192.168.1.77", "", True),
        ("192.168.1.*", "192.168.2.1", "", False),
        ("192.168.1.*", "10.192.168.1.5", "", False),
        ("192.168.*.5", "192.168.3.5", "", True),
        ("192.168.1.1", "192.168.1.1", "", True),
        # dispy's re.match also accepted 192.168.1.10 here: we match the whole address
        ("192.168.1.1", "192.168.1.10", "", False),
        ("192.168.1.1", "192x168x1x1", "", False),
        ("::1", "0:0:0:0:0:0:0:1", "", True),
        ("node*", "10.0.0.1", "node7", True),
        ("node*", "10.0.0.1", "web1", False),
        ("Node-A", "10.9.9.9", "node-a", True),
    ],
)
def test_allocate_match_by_address_or_name(host, ip_addr, name, matches, lookups):
    spec = NodeAllocate(host)
    assert spec.matches(ip_addr, name) is matches
    assert spec.allocate(FakeCluster(), ip_addr, name, 4) == (4 if matches else 0)


def test_allocate_host_name_matches_resolved_address(lookups):
    spec = NodeAllocate("node-a", cpus=1)
    assert spec.allocate(FakeCluster(), "10.1.1.1", "other-name", 4) == 1
    assert spec.allocate(FakeCluster(), "10.1.1.2", "other-name", 4) == 0
    assert lookups == ["node-a"]


def test_allocate_wildcard_never_looks_up_names(lookups):
    spec = NodeAllocate("10.0.*")
    spec.allocate(FakeCluster(), "10.1.0.1", "host", 2)
    assert lookups == []


def test_allocate_accepts_avail_info_and_platform_as_keywords():
    spec = NodeAllocate("*")
    info = DispyNodeAvailInfo(90.0, 1 << 30, 1 << 30, 100.0)
    cpus = spec.allocate(
        FakeCluster(), "10.0.0.1", "n1", 3, avail_info=info, platform="Linux"
    )
    assert cpus == 3


def test_allocate_subclass_override_sets_per_node_depends_and_setup_args():
    calls = []

    class PerNode(NodeAllocate):
        # dispy's examples use this exact signature, including platform='*'
        def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform="*"):
            calls.append((cluster.name, ip_addr, name, cpus, avail_info, platform))
            if platform.startswith("Windows"):
                return 0
            self.depends = [f"{name}.dat"]
            self.setup_args = [ip_addr]
            return min(cpus, 2)

    spec = PerNode(host="*")
    cluster = FakeCluster()
    assert (
        spec.allocate(cluster, "10.0.0.1", "n1", 8, avail_info=None, platform="L") == 2
    )
    assert (spec.depends, spec.setup_args) == (["n1.dat"], ("10.0.0.1",))
    assert spec.allocate(cluster, "10.0.0.2", "n2", 8, platform="Windows-10") == 0
    assert calls == [
        ("fake", "10.0.0.1", "n1", 8, None, "L"),
        ("fake", "10.0.0.2", "n2", 8, None, "Windows-10"),
    ]


def test_allocate_subclass_setting_bad_setup_args_raises_configuration_error():
    class Bad(NodeAllocate):
        def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
            self.setup_args = "not a tuple"
            return cpus

    with pytest.raises(ConfigurationError, match="setup_args of node"):
        Bad("*").allocate(FakeCluster(), "10.0.0.1", "n1", 1, platform="")


# -- is_wildcard ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [("*", True), ("10.0.*", True), ("node*", True), ("10.0.0.1", False), ("n", False)],
)
def test_is_wildcard_detects_star(host, expected):
    assert is_wildcard(NodeAllocate(host)) is expected


# -- parse_node_specs -----------------------------------------------------------------


def hosts(specs: list[NodeAllocate]) -> list[str]:
    return [spec.host for spec in specs]


def test_parse_none_returns_empty_list():
    assert parse_node_specs(None) == []
    assert parse_node_specs([]) == []


def test_parse_single_string_returns_one_spec():
    [spec] = parse_node_specs("10.0.0.1:9800")
    assert (spec.host, spec.port) == ("10.0.0.1", 9800)


def test_parse_strings_with_ports_and_ipv6():
    specs = parse_node_specs(["10.0.0.1", "10.0.0.2:9800", "[::1]:9801", "fd00::7"])
    assert [(s.host, s.port) for s in specs] == [
        ("10.0.0.1", None),
        ("10.0.0.2", 9800),
        ("::1", 9801),
        ("fd00::7", None),
    ]


def test_parse_node_allocate_instance_is_kept_as_is():
    spec = NodeAllocate("10.0.0.1", cpus=2)
    assert parse_node_specs([spec])[0] is spec
    assert parse_node_specs(spec)[0] is spec


def test_parse_tuple_with_trailing_items_optional():
    full, short = parse_node_specs(
        [("10.0.0.1", 9800, 2, ["dep.py"], [1]), ("10.0.0.2",)]
    )
    assert (full.host, full.port, full.cpus) == ("10.0.0.1", 9800, 2)
    assert (full.depends, full.setup_args) == (["dep.py"], (1,))
    assert (short.host, short.port, short.cpus) == ("10.0.0.2", None, 0)


def test_parse_list_item_same_as_tuple():
    [spec] = parse_node_specs([["10.0.0.1", None, -1]])
    assert (spec.host, spec.port, spec.cpus) == ("10.0.0.1", None, -1)


def test_parse_dict_with_all_keys():
    [spec] = parse_node_specs(
        [
            {
                "host": "10.0.0.*",
                "port": 9800,
                "cpus": 3,
                "depends": ["d.py"],
                "setup_args": (5,),
            }
        ]
    )
    assert (spec.host, spec.port, spec.cpus) == ("10.0.0.*", 9800, 3)
    assert (spec.depends, spec.setup_args) == (["d.py"], (5,))


def test_parse_dict_without_host_means_any_node():
    [spec] = parse_node_specs([{"cpus": 1}])
    assert (spec.host, spec.cpus) == ("*", 1)


def test_parse_dict_unknown_key_raises_configuration_error():
    with pytest.raises(
        ConfigurationError, match=r"nodes\[0\] has unknown keys \['cpu'\]"
    ):
        parse_node_specs([{"host": "*", "cpu": 2}])


def test_parse_dispy_node_uses_its_address_and_port():
    [spec] = parse_node_specs([DispyNode("10.0.0.3", "n3", 4, port=9802)])
    assert (spec.host, spec.port, spec.cpus) == ("10.0.0.3", 9802, 0)


def test_parse_object_with_node_specs_calls_it():
    class Local:
        def node_specs(self) -> list[object]:
            return ["127.0.0.1:9801", NodeAllocate("127.0.0.1:9802", cpus=1)]

    specs = parse_node_specs(Local())
    assert [(s.host, s.port) for s in specs] == [
        ("127.0.0.1", 9801),
        ("127.0.0.1", 9802),
    ]
    assert hosts(parse_node_specs(["10.0.0.9", Local()])) == [
        "10.0.0.9",
        "127.0.0.1",
        "127.0.0.1",
    ]


def test_parse_orders_specific_hosts_before_wildcards():
    specs = parse_node_specs(
        ["*", "192.168.*", "10.0.0.5", "192.168.1.*", "node-a", "[::1]:9800"]
    )
    assert hosts(specs) == [
        "10.0.0.5",
        "node-a",
        "::1",
        "192.168.1.*",
        "192.168.*",
        "*",
    ]


def test_parse_does_not_resolve_names(lookups):
    parse_node_specs(["node-a", "*", "10.0.0.1"])
    assert lookups == []


@pytest.mark.parametrize(
    ("nodes", "match"),
    [
        (["10.0.0.1", 3.5], r"nodes\[1\] is 3.5 \(float\).*NodeAllocate"),
        ([None], r"nodes\[0\] is None \(NoneType\).*a host string"),
        ([object], r"nodes\[0\] is <class 'object'>"),
        ([()], r"nodes\[0\] is \(\) \(tuple\)"),
        ([("h", 1, 0, [], (), "extra")], r"nodes\[0\] is .*\(host, port, cpus"),
        (9800, r"nodes is 9800 \(int\); give a list"),
        ({"10.0.0.1"}, r"nodes is .* \(set\); give a list"),
    ],
)
def test_parse_bad_item_raises_configuration_error_naming_it(nodes, match):
    with pytest.raises(ConfigurationError, match=match):
        parse_node_specs(nodes)


def test_parse_bad_setup_args_in_tuple_names_item_and_fix():
    with pytest.raises(ConfigurationError) as info:
        parse_node_specs(["*", ("10.0.0.1", None, 0, [], "arg")])
    message = str(info.value)
    assert message.startswith("nodes[1]: setup_args of node '10.0.0.1' must be a tuple")
    assert "setup_args=(value,)" in message


def test_parse_bad_port_in_string_names_item():
    with pytest.raises(ConfigurationError, match=r"nodes\[0\]: node port must be"):
        parse_node_specs(["10.0.0.1:0"])


def test_parse_bad_item_from_node_specs_names_source():
    class Broken:
        def node_specs(self) -> list[object]:
            return [42]

    with pytest.raises(ConfigurationError, match=r"nodes\.node_specs\(\)\[0\] is 42"):
        parse_node_specs(Broken())


def test_dispy_node_takes_dispys_argument_order() -> None:
    node = DispyNode("10.0.0.7", "n7", 8)  # dispy: DispyNode(ip_addr, name, cpus)
    assert (node.ip_addr, node.name, node.cpus, node.avail_cpus) == (
        "10.0.0.7",
        "n7",
        8,
        8,
    )
    assert node.port == 9711  # dispynb's default node port


def test_allocate_negative_cpus_gives_all_but_that_many_or_declines():
    """cpus=-N leaves N of the node's CPUs unused; one that cannot declines the
    node (the migration guide: dispy's used all its CPUs then)."""
    spec = NodeAllocate("127.0.0.1", cpus=-1)
    assert spec.allocate(None, "127.0.0.1", "n", 3) == 2
    assert NodeAllocate("127.0.0.1", cpus=-5).allocate(None, "127.0.0.1", "n", 3) == 0
