"""Rate-limit response headers, both families (shared/reference/features.md §2.8): Inferneo's
`X-RateLimit-Limit/Remaining/Reset` (reset as epoch seconds) and OpenAI's `x-ratelimit-{limit,remaining,reset}-
{requests,tokens}` (reset as a duration such as `12s`). For requests, whichever window binds first is reported:
the minute, or the day once fewer requests remain in it than in the minute."""

from __future__ import annotations

import math

from broker.rate_limits import DAY_S, MINUTE_S, current
from contracts.accounts import RateLimits, UsageWindows


def duration(seconds: float) -> str:
    """OpenAI's reset format: `850ms`, `17s`, `6m0s`, `3h12m5s`."""
    if (millis := max(0, math.ceil(seconds * 1000))) < 1000:
        return f"{millis}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _request_window(limits: RateLimits, w: UsageWindows, now: float) -> tuple[int, int, float] | None:
    """(limit, remaining, reset epoch) of the binding requests window, if any is limited."""
    windows = []
    if limits.requests_per_minute is not None:
        windows.append(
            (limits.requests_per_minute, limits.requests_per_minute - w.minute_requests, (w.minute + 1) * MINUTE_S)
        )
    if limits.requests_per_day is not None:
        windows.append((limits.requests_per_day, limits.requests_per_day - w.day_requests, (w.day + 1) * DAY_S))
    return min(windows, key=lambda window: window[1], default=None)


def rate_limit_headers(limits: RateLimits, windows: UsageWindows, now: float) -> dict[str, str]:
    w = current(windows, now)
    headers: dict[str, str] = {}
    if (requests := _request_window(limits, w, now)) is not None:
        limit, remaining, reset = requests
        remaining = max(0, remaining)
        headers |= {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(int(reset)),
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": duration(reset - now),
        }
    if limits.tokens_per_minute is not None:
        headers |= {
            "x-ratelimit-limit-tokens": str(limits.tokens_per_minute),
            "x-ratelimit-remaining-tokens": str(max(0, limits.tokens_per_minute - w.minute_tokens)),
            "x-ratelimit-reset-tokens": duration((w.minute + 1) * MINUTE_S - now),
        }
    return headers
