"""Both rate-limit header families from one caller's windows."""

from __future__ import annotations

from api.auth.headers import duration, rate_limit_headers
from contracts.accounts import RateLimits, UsageWindows

NOW = 1_700_000_010.25  # 30.25 s into a minute
MINUTE, DAY = int(NOW // 60), int(NOW // 86_400)
SEED = RateLimits(requests_per_minute=60, tokens_per_minute=150_000, requests_per_day=3_500)


def test_durations_in_openai_format() -> None:
    assert [duration(s) for s in (0.012, 0.9991, 1, 17.2, 360, 11525)] == ["12ms", "1s", "1s", "18s", "6m0s", "3h12m5s"]


def test_minute_window_with_both_families() -> None:
    windows = UsageWindows(minute=MINUTE, minute_requests=1, minute_tokens=120, day=DAY, day_requests=1)
    headers = rate_limit_headers(SEED, windows, NOW)
    assert headers["X-RateLimit-Limit"] == headers["x-ratelimit-limit-requests"] == "60"
    assert headers["X-RateLimit-Remaining"] == headers["x-ratelimit-remaining-requests"] == "59"
    assert headers["X-RateLimit-Reset"] == str((MINUTE + 1) * 60)
    assert headers["x-ratelimit-reset-requests"] == "30s"
    assert headers["x-ratelimit-limit-tokens"] == "150000"
    assert headers["x-ratelimit-remaining-tokens"] == "149880"
    assert headers["x-ratelimit-reset-tokens"] == "30s"


def test_the_day_reports_once_it_binds_first() -> None:
    windows = UsageWindows(minute=MINUTE, minute_requests=1, day=DAY, day_requests=3_499)
    headers = rate_limit_headers(SEED, windows, NOW)
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == ("3500", "1")
    assert headers["X-RateLimit-Reset"] == str((DAY + 1) * 86_400)


def test_stale_windows_report_a_fresh_budget_and_unlimited_dimensions_are_left_out() -> None:
    old = UsageWindows(minute=MINUTE - 5, minute_requests=60, minute_tokens=10, day=DAY, day_requests=5)
    headers = rate_limit_headers(RateLimits(requests_per_minute=60), old, NOW)
    assert headers["X-RateLimit-Remaining"] == "60"
    assert not any(name.endswith("-tokens") for name in headers)
    assert rate_limit_headers(RateLimits(), old, NOW) == {}
