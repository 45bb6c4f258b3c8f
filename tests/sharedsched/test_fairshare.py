"""The scheduler's choice of whose job takes a free CPU (schedserver.fairshare)."""

from __future__ import annotations

from schedserver.fairshare import Account, FairShare


def account(user: str, order: int, queued: int = 100, **kw: bool) -> Account:
    return Account(user, order, queued=queued, nodes={"n1", "n2"}, **kw)


def fill(fair: FairShare, accounts: list[Account], slots: int) -> dict[str, int]:
    taken: dict[str, int] = {}
    for _ in range(slots):
        chosen = fair.pick(accounts, "n1")
        assert chosen is not None
        fair.started(chosen)
        taken[chosen.user] = taken.get(chosen.user, 0) + 1
    return taken


def test_slots_split_evenly_between_users_not_computations() -> None:
    fair = FairShare()
    # alice has three computations, bob one: still half the CPUs each
    accounts = [account("alice", 1), account("alice", 2), account("alice", 3)]
    accounts.append(account("bob", 4))
    assert fill(fair, accounts, 8) == {"alice": 4, "bob": 4}


def test_a_freed_slot_goes_to_the_user_with_fewest_in_flight() -> None:
    fair = FairShare()
    alice, bob = account("alice", 1), account("bob", 2)
    fill(fair, [alice, bob], 4)
    fair.ended(alice)
    fair.ended(alice)
    assert fair.pick([alice, bob], "n1") is alice


def test_a_user_alone_gets_every_slot_and_quota_caps_it() -> None:
    fair = FairShare(max_cpus=3)
    alice, bob = account("alice", 1), account("bob", 2, queued=0)
    assert fill(fair, [alice, bob], 3) == {"alice": 3}
    assert fair.pick([alice, bob], "n1") is None  # quota reached; bob has nothing


def test_computation_not_set_up_on_the_node_gets_no_slot_there() -> None:
    fair = FairShare()
    alice = Account("alice", 1, queued=5, nodes={"n2"})
    assert fair.pick([alice], "n1") is None
    assert fair.pick([alice], "n2") is alice


def test_a_node_taken_out_gets_none_of_that_computations_jobs() -> None:
    """deallocate_node: alice's computation gets no slot of n1 (bob's does, alone
    there), until she gives it back."""
    fair = FairShare()
    alice, bob = account("alice", 1), account("bob", 2)
    alice.limits["n1"] = 0
    assert fair.pick([alice, bob], "n1") is bob
    assert fair.pick([alice], "n1") is None
    assert fair.pick([alice], "n2") is alice
    del alice.limits["n1"]
    assert fair.pick([alice], "n1") is alice


def test_a_computations_cpu_limit_on_a_node_bounds_only_its_own_jobs_there() -> None:
    """set_node_cpus(n1, 1): one of alice's jobs at a time on n1 (the next slot
    there is bob's, as many as he gets), any number on n2; one ending frees it."""
    fair = FairShare()
    alice, bob = account("alice", 1), account("bob", 2)
    alice.limits["n1"] = 1
    assert fair.pick([alice], "n1") is alice
    fair.started(alice, node="n1")
    assert fair.pick([alice], "n1") is None
    assert fair.pick([alice, bob], "n1") is bob
    fair.started(bob, node="n1")
    fair.started(bob, node="n1")
    assert fair.pick([alice, bob], "n1") is bob
    for _ in range(3):
        assert fair.pick([alice], "n2") is alice
        fair.started(alice, node="n2")
    assert alice.busy == {"n1": 1, "n2": 3}
    fair.ended(alice, node="n1")
    assert fair.pick([alice], "n1") is alice
    fair.ended(alice, alice.in_flight)  # its computation closed
    assert alice.busy == {}


def test_jobs_pinned_to_a_node_go_to_that_node_only() -> None:
    """submit_node: a computation whose queued jobs are all pinned to n2 gets no
    slot of n1 (another user's job takes it) but one of n2; with a job for any
    node too, it gets n1's."""
    fair = FairShare()
    pinned = account("alice", 1, queued=2)
    pinned.pinned = {"n2": 2}
    bob = account("bob", 2)
    assert fair.pick([pinned, bob], "n1") is bob
    assert fair.pick([pinned, bob], "n2") is pinned
    pinned.queued, pinned.pinned = 3, {"n2": 2}  # and one for any node
    assert fair.pick([pinned], "n1") is pinned


def test_exclusive_waits_for_others_to_drain_then_runs_alone() -> None:
    fair = FairShare()
    alice, bob = account("alice", 1), account("bob", 2, exclusive=True)
    fair.started(alice)
    assert fair.pick([alice, bob], "n1") is None  # bob waits, alice gets no more
    fair.ended(alice)
    assert fair.pick([alice, bob], "n1") is bob
    fair.started(bob)
    assert fair.pick([alice, bob], "n1") is bob
