"""The batcher's window policy on its own: no server, no event loop, no clock."""

from __future__ import annotations

from service.engine.window import LONE_WINDOWS, PROBE_EVERY, REMEASURE_EVERY, WindowPolicy


def test_without_a_window_no_batch_waits() -> None:
    policy = WindowPolicy(0.0)
    assert policy.delay == 0.0
    assert [policy.waits() for _ in range(PROBE_EVERY + 1)] == [False] * (PROBE_EVERY + 1)


def test_a_window_waits_until_it_has_gathered_nobody_lone_windows_times() -> None:
    policy = WindowPolicy(0.002)
    assert policy.delay == 0.002
    for _ in range(LONE_WINDOWS):
        assert policy.waits()
        policy.record(1, waited=True, full=True)
    assert not policy.waits()


def test_a_skipped_window_is_probed_every_probe_every_th_batch() -> None:
    policy = WindowPolicy(0.002)
    for _ in range(LONE_WINDOWS):
        policy.waits()
        policy.record(1, waited=True, full=True)
    decisions = []
    for _ in range(2 * PROBE_EVERY):
        waits = policy.waits()
        decisions.append(waits)
        policy.record(1, waited=waits, full=waits)
    expected = [False] * (PROBE_EVERY - 1) + [True]
    assert decisions == expected * 2


def test_company_brings_the_window_back() -> None:
    policy = WindowPolicy(0.002)
    for _ in range(LONE_WINDOWS):
        policy.waits()
        policy.record(1, waited=True, full=True)
    for _ in range(PROBE_EVERY - 1):
        assert not policy.waits()
    assert policy.waits()  # the probe
    policy.record(2, waited=True, full=True)
    assert all(policy.waits() for _ in range(LONE_WINDOWS))


def test_a_batch_that_did_not_wait_does_not_count_as_lone() -> None:
    policy = WindowPolicy(0.002)
    for _ in range(LONE_WINDOWS + 5):
        policy.record(1, waited=False, full=False)
    assert policy.waits()


def test_no_target_until_a_full_window_gathers_two_or_more() -> None:
    policy = WindowPolicy(0.002)
    assert policy.target() == 0
    policy.record(1, waited=True, full=True)
    assert policy.target() == 0
    policy.record(3, waited=True, full=False)  # ended early (the batch filled): measures nothing
    assert policy.target() == 0


def test_a_window_ends_at_the_company_of_the_last_full_one() -> None:
    policy = WindowPolicy(0.002)
    policy.record(3, waited=True, full=True)
    assert policy.target() == 3
    policy.record(3, waited=True, full=False)
    assert policy.target() == 3
    policy.record(2, waited=True, full=True)  # fewer came: the window ran out, two is the mark
    assert policy.target() == 2


def test_every_remeasure_every_th_window_runs_in_full() -> None:
    policy = WindowPolicy(0.002)
    policy.record(2, waited=True, full=True)
    targets = []
    for _ in range(REMEASURE_EVERY):
        targets.append(policy.target())
        policy.record(2, waited=True, full=targets[-1] == 0)
    assert targets == [2] * (REMEASURE_EVERY - 1) + [0]
    assert policy.target() == 2  # the full one measured two again


def test_a_full_window_that_collected_nobody_measures_nothing() -> None:
    # With two instances both wait the same window; the one that finds it empty records 0.
    policy = WindowPolicy(0.002)
    policy.record(3, waited=True, full=True)
    policy.record(0, waited=True, full=True)
    assert policy.target() == 3
