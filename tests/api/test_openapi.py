"""`/openapi.json` describes every HTTP route the app serves."""

from __future__ import annotations

from api.app import create_app
from common.settings import Settings


def test_every_http_route_is_in_the_schema() -> None:
    app = create_app(Settings(nats_url="nats://127.0.0.1:1"))  # no lifespan runs: nothing connects
    schema = app.openapi()
    documented = {(path, method.upper()) for path, item in schema["paths"].items() for method in item}
    expected = {
        ("/v1/completions", "POST"),
        ("/v1/chat/completions", "POST"),
        ("/v1/embeddings", "POST"),
        ("/v1/models", "GET"),
        ("/v1/models/{model_id}", "GET"),
        ("/complete", "POST"),
        ("/evaluate", "POST"),
        ("/embed", "POST"),
        ("/tokenize", "POST"),
        ("/detokenize", "POST"),
        ("/v1/tokenize", "POST"),
        ("/models_available", "GET"),
        ("/users/me/token", "POST"),
        ("/v1/files", "POST"),
        ("/v1/batches", "POST"),
        ("/v1/batches/{batch_id}/cancel", "POST"),
        ("/health", "GET"),
        ("/version", "GET"),
        ("/v1/gpu/info", "GET"),
    }
    assert expected <= documented, expected - documented
    completions = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert completions["schema"]  # request bodies are described, not opaque
