"""Which roles may call which route, decided by method and path before any router runs, so routes added later
(by anyone) are covered without their code knowing: a path no rule names is admin-only. The table is rendered in
docs/security.md; keep the two in step."""

from __future__ import annotations

import re
from dataclasses import dataclass

from contracts.accounts import Role

ADMIN, WORKER, CLIENT, MONITOR = Role.ADMIN, Role.WORKER, Role.CLIENT, Role.MONITOR
PUBLIC: frozenset[Role] = frozenset()  # no credential needed
ANY_ROLE = frozenset(Role)
ADMIN_ONLY = frozenset({ADMIN})


@dataclass(frozen=True, slots=True)
class Rule:
    route_class: str
    pattern: re.Pattern[str]
    roles: frozenset[Role]
    methods: frozenset[str] | None = None  # None: every method (and WebSocket)
    aleph: bool = False  # Aleph Alpha routes: refusals use the statuses its client knows (api/errors.py)

    def matches(self, method: str, path: str) -> bool:
        return (self.methods is None or method in self.methods) and self.pattern.fullmatch(path) is not None


def _rule(
    route_class: str,
    pattern: str,
    roles: frozenset[Role] | set[Role],
    methods: str | None = None,
    *,
    aleph: bool = False,
) -> Rule:
    return Rule(
        route_class, re.compile(pattern), frozenset(roles), frozenset(methods.split()) if methods else None, aleph
    )


_READ = "GET HEAD"
# First match wins.
RULES: tuple[Rule, ...] = (
    _rule("public", r"/health|/version", PUBLIC),
    _rule("console", r"/|/ui(/.*)?", PUBLIC, _READ),  # static files; the page then asks for a key
    _rule("login", r"/users/me/token", PUBLIC, "POST"),
    _rule("own account", r"/users/me(/.*)?", ANY_ROLE),
    _rule("admin", r"/admin(/.*)?", ADMIN_ONLY),
    _rule("monitoring", r"/metrics(/cluster)?", {ADMIN, MONITOR}),
    _rule("hardware", r"/v1/gpu/info", {ADMIN, MONITOR, WORKER}),
    # Clients deploy and stop their own (others' are a 404); monitors read every deployment's status and logs.
    _rule("deployment status", r"/api/v1/deployments(/.*)?", {ADMIN, MONITOR, CLIENT}, _READ),
    _rule("deployment changes", r"/api/v1/deploy(ments)?(/.*)?", {ADMIN, CLIENT}),
    _rule("models", r"/v1/models(/.*)?", {ADMIN, CLIENT, WORKER}, _READ),
    _rule("inference", r"/v1/(completions|chat/completions|embeddings|responses(/.*)?)", {ADMIN, CLIENT}),
    _rule("inference", r"/v1/messages(/count_tokens)?", {ADMIN, CLIENT}),  # Anthropic Messages
    _rule("inference", r"/(v1/)?(tokenize|detokenize)", {ADMIN, CLIENT}),
    _rule(
        "inference",
        r"/(complete|embed|semantic_embed|batch_semantic_embed|evaluate|explain|models_available"
        r"|models/.+/tokenizer)",
        {ADMIN, CLIENT},
        aleph=True,
    ),
    _rule("own batches and files", r"/v1/(files|batches)(/.*)?", {ADMIN, CLIENT}),
    _rule("api docs", r"/docs(/.*)?|/redoc|/openapi\.json", ANY_ROLE, _READ),
)
DEFAULT = Rule("unlisted", re.compile(".*"), ADMIN_ONLY)


def rule_for(method: str, path: str) -> Rule:
    """The rule governing a request; WebSocket handshakes use method `GET`."""
    return next((rule for rule in RULES if rule.matches(method, path)), DEFAULT)
