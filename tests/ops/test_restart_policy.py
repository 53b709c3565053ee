"""The restart policy on its own: backoff doubling and its cap, the crash-loop window, a stable run resetting
the backoff, and a configuration refusal never being retried."""

from __future__ import annotations

from ops.restart_policy import EXIT_CONFIG, CrashHistory, GiveUp, Restart, RestartPolicy

POLICY = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=4.0, crash_loop_crashes=5, crash_loop_window_s=60.0)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [POLICY.backoff_s(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_crashes_in_a_row_back_off_then_a_crash_loop_gives_up() -> None:
    history = CrashHistory(POLICY)
    decisions = [history.crashed(now=t, started_at=t - 1, returncode=-9) for t in (1.0, 3.0, 6.0, 10.0, 16.0)]
    assert decisions[:4] == [Restart(0.5), Restart(1.0), Restart(2.0), Restart(4.0)]
    assert isinstance(decisions[4], GiveUp) and "5 times within 60 s" in decisions[4].reason


def test_crashes_spread_over_more_than_the_window_are_not_a_loop() -> None:
    history = CrashHistory(POLICY)
    decisions = [history.crashed(now=t, started_at=t - 5, returncode=1) for t in range(0, 600, 30)]
    assert all(isinstance(decision, Restart) for decision in decisions)


def test_a_run_as_long_as_the_window_resets_the_backoff() -> None:
    history = CrashHistory(POLICY)
    assert history.crashed(now=10, started_at=9, returncode=1) == Restart(0.5)
    assert history.crashed(now=12, started_at=11, returncode=1) == Restart(1.0)
    assert history.crashed(now=200, started_at=13, returncode=1) == Restart(0.5)  # ran 187 s: a fresh start


def test_a_configuration_refusal_is_given_up_at_once() -> None:
    decision = CrashHistory(POLICY).crashed(now=1, started_at=0, returncode=EXIT_CONFIG)
    assert isinstance(decision, GiveUp) and "configuration" in decision.reason
