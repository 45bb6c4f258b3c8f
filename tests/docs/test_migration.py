"""The migration guide's statuses are computed from the code (no build needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "docs" / "_ext"))

from dispynb_docs import dispy_names, migration
from dispynb_docs.dispy_names import Name

STATUSES = {migration.SAME, migration.DIFFERENT, migration.NOT_SUPPORTED}


@pytest.mark.parametrize("key", sorted(migration.TABLES))
def test_every_dispy_name_gets_a_status(key: str) -> None:
    _title, rows_of = migration.TABLES[key]
    rows = rows_of()
    assert [row.name for row in rows] == migration.all_names()[key]
    for row in rows:
        assert row.status in STATUSES, row
        if row.status != migration.SAME:
            assert row.note or row.detail, f"{row.name}: say how or why"


def test_a_name_dispynb_lacks_is_not_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        dispy_names, "MODULE", [Name("JobCluster"), Name("NoSuchName", missing="Why.")]
    )
    rows = migration.module_rows()
    assert [(r.name, r.status) for r in rows] == [
        ("JobCluster", migration.SAME),
        ("NoSuchName", migration.NOT_SUPPORTED),
    ]
    assert rows[1].note == "Why."


def test_jobcluster_keywords_are_asked_of_the_code() -> None:
    import dispynb

    accepted = migration.accepted_keywords(dispynb.JobCluster)
    assert {"computation", "nodes", "secret", "reentrant", "callback"} <= accepted
    assert "no_such_keyword" not in accepted


def test_node_options_are_asked_of_dispynb_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        dispy_names,
        "NODE_OPTIONS",
        [
            Name("--cpus", sample=("--cpus", "1")),
            Name("--no-such-option", sample=("--no-such-option",), missing="Gone."),
            Name("--port", sample=("--port", "99999")),
        ],
    )
    cpus, gone, port = migration.node_option_rows()
    assert cpus.status == migration.SAME
    assert "CPUs" in cpus.detail  # dispynb-node's own help text
    assert gone.status == migration.NOT_SUPPORTED
    assert gone.note == "Gone."
    # Accepted by the parser but refused by the node: its message is shown.
    assert port.status == migration.NOT_SUPPORTED
    assert "99999" in port.detail


def test_dispyscheduler_options_are_asked_of_dispynb_scheduler() -> None:
    """A service unit that ran ``dispyscheduler.py`` with its options: the guide
    listed dispynode's options only, so nobody knew which of the scheduler's
    dispynb-scheduler takes. Each is given to its parser, with a users file."""
    rows = {row.name: row for row in migration.scheduler_option_rows()}
    # dispyscheduler 4.15's options, short and long forms.
    assert {"-n", "--node", "-p", "--port", "--node_secret", "--cluster_secret",
            "--pulse_interval", "--httpd", "--cleanup_nodes", "--daemon",
            "--ipv4_udp_multicast", "--max_file_size"} <= set(rows)  # fmt: skip
    assert rows["--node_secret"].program == "dispynb-scheduler"
    assert rows["--pulse_interval"].status == migration.SAME
    assert "seconds between pings to nodes" in rows["--pulse_interval"].detail
    # Certificate options are taken (the samples' certificate is a real one).
    assert rows["--cluster_certfile"].status == migration.SAME, rows
    assert rows["--node_keyfile"].status == migration.SAME, rows
    refused = rows["--cleanup_nodes"]
    assert refused.status == migration.NOT_SUPPORTED and refused.refused
    # The refusal says what to do instead: the nodes' own option.
    assert "--force_cleanup" in refused.detail, refused.detail
    assert "--users" in migration.added_scheduler_options()
    assert not set(rows) & set(migration.added_scheduler_options())


def test_older_dispyscheduler_options_are_dispys_not_dispynbs_additions() -> None:
    """dispyscheduler took ``--node_port`` up to 4.10 and ``--poll_interval`` from
    3.15 to 4.2; dispynb-scheduler accepts both, and the guide listed them among
    dispynb's own additions instead of as dispy's options."""
    rows = {row.name: row for row in migration.scheduler_option_rows()}
    added = migration.added_scheduler_options()
    for name in ("--node_port", "--poll_interval"):
        assert name not in added, added
        assert rows[name].status != migration.NOT_SUPPORTED, rows[name]
    assert "4.10" in rows["--node_port"].meaning
    assert "4.2" in rows["--poll_interval"].meaning


def test_what_dispynb_adds_is_computed() -> None:
    dispy = set(migration.all_names()["jobcluster"] + migration.all_names()["shared"])
    added = migration.added_keywords()
    assert "cafile" in added
    assert not dispy & set(added)
    options = migration.added_node_options()
    assert "--orphan-timeout" in options
    assert not set(migration.all_names()["dispynode"]) & set(options)


def test_submit_keywords_are_found_in_the_parts_of_jobcluster() -> None:
    """``dispy_job_depends`` is read by ``submit`` in ``_clusterjobs``, a part of
    ``JobCluster``: the guide says dispynb has it."""
    (row,) = [
        r for r in migration.submit_keyword_rows() if r.name == "dispy_job_depends"
    ]
    assert row.status != migration.NOT_SUPPORTED, row


def test_shared_job_cluster_row_names_the_scheduler_program() -> None:
    """While ``dispyscheduler.py`` has a dispynb program, the guide's
    ``SharedJobCluster`` row says to use it, not that there is none."""
    (program,) = [r for r in migration.program_rows() if r.name == "dispyscheduler.py"]
    (shared,) = [r for r in migration.module_rows() if r.name == "SharedJobCluster"]
    assert program.status != migration.NOT_SUPPORTED
    assert "dispynb-scheduler" in shared.note, shared.note


#: Each table's rows and the names they are made of.
_TABLES = {
    "MODULE": migration.module_rows,
    "JOBCLUSTER": migration.jobcluster_rows,
    "SHARED": migration.shared_rows,
    "METHODS": migration.method_rows,
    "JOB": migration.job_rows,
    "NODE": migration.node_rows,
    "JOB_GLOBALS": migration.job_global_rows,
    "NODE_OPTIONS": migration.node_option_rows,
    "SCHEDULER_OPTIONS": migration.scheduler_option_rows,
    "PROGRAMS": migration.program_rows,
}


@pytest.mark.parametrize("table", sorted(_TABLES))
def test_a_name_dispynb_has_says_nothing_of_lacking_it(table: str) -> None:
    """``missing`` is shown only for a name dispynb lacks: left on a name it gained
    since, it is never shown and says the opposite of the code (the node's
    --scheduler_host 'announces to no scheduler' while it registers with one, and
    its row said 'same' as dispynode's, with nothing about the scheduler's
    --register_port it needs)."""
    entries = {e.name: e for e in getattr(dispy_names, table)}
    dead = [
        row.name
        for row in _TABLES[table]()
        if row.status != migration.NOT_SUPPORTED and entries[row.name].missing
    ]
    assert dead == [], f"give these a note or differs= instead of missing=: {dead}"


def test_the_nodes_scheduler_host_row_says_what_the_scheduler_needs() -> None:
    (row,) = [r for r in migration.node_option_rows() if r.name == "--scheduler_host"]
    assert row.status == migration.DIFFERENT, row
    assert "--register_port" in row.note and "secret" in row.note, row.note
