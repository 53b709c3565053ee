"""Route classes → roles: every role against one route of each class, and the secure default."""

from __future__ import annotations

import pytest

from api.auth.policy import PUBLIC, rule_for
from contracts.accounts import Role

A, W, C, M = Role.ADMIN, Role.WORKER, Role.CLIENT, Role.MONITOR

# (method, path, roles allowed); an empty set: public.
MATRIX = [
    ("GET", "/health", set()),
    ("GET", "/version", set()),
    ("POST", "/users/me/token", set()),
    ("DELETE", "/users/me/token", {A, W, C, M}),
    ("GET", "/admin/keys", {A}),
    ("POST", "/admin/users", {A}),
    ("GET", "/metrics", {A, M}),
    ("GET", "/metrics/cluster", {A, M}),  # the console's JSON of the same numbers
    ("GET", "/metrics/other", {A}),
    ("GET", "/", set()),  # a browser is sent to the console
    ("GET", "/ui/", set()),  # the console's static files; the page asks for a key
    ("GET", "/ui/js/main.js", set()),
    ("POST", "/ui/", {A}),  # only reads are public
    ("GET", "/users/me", {A, W, C, M}),
    ("GET", "/v1/gpu/info", {A, M, W}),
    ("GET", "/api/v1/deployments/d1/logs", {A, M, C}),
    ("POST", "/api/v1/deploy", {A, C}),
    ("DELETE", "/api/v1/deployments/d1", {A, C}),
    ("GET", "/v1/models", {A, C, W}),
    ("POST", "/v1/chat/completions", {A, C}),
    ("GET", "/v1/chat/completions", {A, C}),  # the WebSocket handshake
    ("POST", "/v1/messages", {A, C}),
    ("POST", "/v1/messages/count_tokens", {A, C}),
    ("POST", "/v1/messages/batches", {A}),  # not served: unlisted, so admin-only
    ("POST", "/v1/completions", {A, C}),
    ("POST", "/v1/embeddings", {A, C}),
    ("POST", "/tokenize", {A, C}),
    ("POST", "/v1/detokenize", {A, C}),
    ("POST", "/complete", {A, C}),
    ("GET", "/models_available", {A, C}),
    ("GET", "/models/tiny-llama/tokenizer", {A, C}),
    ("POST", "/v1/batches", {A, C}),
    ("GET", "/v1/files/file-1/content", {A, C}),
    ("GET", "/openapi.json", {A, W, C, M}),
    ("POST", "/something/new", {A}),  # unlisted routes are admin-only until the table names them
    ("GET", "/healthz", {A}),  # close to a public path is not public
]


@pytest.mark.parametrize(("method", "path", "allowed"), MATRIX)
def test_roles_per_route_class(method: str, path: str, allowed: set[Role]) -> None:
    rule = rule_for(method, path)
    assert set(rule.roles) == allowed
    assert (rule.roles == PUBLIC) == (not allowed)
