"""Every route of /openapi.json fuzzed by schemathesis (requests that follow the schema and requests that break
it), each sent with a valid admin key and without one: no 5xx ever, and every error in the API's own shape.
A real nats-server, a sim worker (no model needed), the real app; auth on, rate limits off (the fuzzer is not
what they are for)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from broker.embedded import EmbeddedNatsServer
from common.settings import Settings
from tests.integration.harness import ApiServer, WorkerProcess

ADMIN_KEY = "fuzz-admin-key"
SIM_MODEL = "sim-fuzz"
EXAMPLES_PER_ROUTE = 30  # schema-valid and schema-violating requests mixed
# Reading a deployment's log stream follows it until it ends: a fuzzer's call would wait forever.
ENDLESS = r"/logs/stream$"
NO_AGENT = "no deployment agent is running"


@pytest.fixture(scope="module")
def fuzzed_api(base_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("fuzz")
    with EmbeddedNatsServer(root / "nats", port=-1) as nats:
        settings = base_settings.model_copy(
            update={
                "nats_url": nats.url,
                "data_dir": root / "data",
                "engine": "sim",
                "served_model_name": SIM_MODEL,
                "sim_tokens_per_s": 2000.0,
                "max_num_seqs": 64,
                "api_keys": [ADMIN_KEY],
                "batch_runner": False,
                "rate_limit_requests_per_minute": 0,
                "rate_limit_requests_per_day": 0,
                "rate_limit_tokens_per_minute": 0,
                "queue_timeout_s": 10.0,
            }
        )
        worker = WorkerProcess(settings, root / "worker.log").start()
        api = ApiServer(settings).start()
        try:
            _wait_for_model(api.base_url, worker)
            yield api
        finally:
            api.stop()
            worker.stop()


def _wait_for_model(base_url: str, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + 120
    while SIM_MODEL not in httpx.get(f"{base_url}/health", timeout=5).json().get("models", []):
        assert worker.proc.poll() is None, worker.log_tail()
        assert time.monotonic() < deadline, "the sim worker did not register"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fuzz_schema(fuzzed_api: ApiServer):
    return schemathesis.openapi.from_url(
        f"{fuzzed_api.base_url}/openapi.json", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )


def assert_own_shape(response, case) -> None:
    where = f"{case.method} {case.formatted_path} -> {response.status_code}"
    if NO_AGENT in response.text:
        return  # a valid deploy with no agent to run it: the honest answer here (this setup starts none)
    assert response.status_code < 500, f"{where}: {response.text[:500]}"
    if response.status_code >= 400 and case.path.startswith("/v1/messages"):  # Anthropic's routes: its shape
        body = response.json()
        assert set(body) == {"type", "error"} and body["type"] == "error", f"{where}: {body}"
        assert set(body["error"]) == {"type", "message"} and body["error"]["message"], f"{where}: {body}"
    elif response.status_code >= 400:
        # OpenAI's shape everywhere else; the deployment routes answer their failures in the Aphrodite guide's
        # variant of it, which has no `param` and the status as `code`.
        body = response.json()
        assert set(body) == {"error"}, f"{where}: {body}"
        error = body["error"]
        assert {"message", "type", "code"} <= set(error) <= {"message", "type", "param", "code"}, f"{where}: {body}"
        assert isinstance(error["message"], str) and error["message"], f"{where}: {body}"


def check(case) -> None:
    """One generated request, sent as the admin and then without credentials."""
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {ADMIN_KEY}"}
    assert_own_shape(case.call(timeout=30), case)
    del case.headers["Authorization"]
    anonymous = case.call(timeout=30)
    assert_own_shape(anonymous, case)
    public = case.path in ("/health", "/version") or (case.method, case.path) == ("POST", "/users/me/token")
    assert public or anonymous.status_code == 401, f"{case.method} {case.path} answered {anonymous.status_code}"


def test_no_input_gets_a_server_error_or_a_foreign_error_shape(fuzz_schema) -> None:
    # schemathesis' pytest plugin does not load under pytest 9, so each operation's strategy runs here.
    failures, fuzzed = [], 0
    for result in fuzz_schema.get_all_operations():
        operation = result.ok()
        if re.search(ENDLESS, operation.path):
            continue
        fuzzed += 1

        @given(case=st.one_of(operation.as_strategy(mode) for mode in GenerationMode))
        @settings(
            max_examples=EXAMPLES_PER_ROUTE,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        def fuzz(case) -> None:
            check(case)

        try:
            fuzz()
        except AssertionError as exc:
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert fuzzed >= 30
    assert not failures, "\n".join(failures)


def test_the_fuzzer_reaches_every_route(fuzz_schema) -> None:
    """The parametrized test above covers what the schema lists: make sure that is every route the app has."""
    paths = set(fuzz_schema.raw_schema["paths"])
    assert {
        "/v1/completions",
        "/v1/chat/completions",
        "/complete",
        "/v1/batches",
        "/api/v1/deploy",
        "/v1/messages",
        "/v1/messages/count_tokens",
    } <= paths
    assert len(paths) >= 30
