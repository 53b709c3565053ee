"""The web console (api/ui) in Debian's chromium against a real stack (tests/browser/conftest.py): one browser and
one stack for the module; each test opens fresh tabs, and the `console` fixture fails a test whose tabs logged a
console error it did not expect. INFERQ_SCREENSHOTS=docs/console writes the screenshots in docs/console.md."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import structlog

from common.settings import Settings
from tests.browser.conftest import (
    ADMIN_KEY,
    CLIENT_KEY,
    HTTP_4XX,
    MAX_FILE_BYTES,
    MODEL,
    MONITOR_KEY,
    OFFLINE,
    PHONE,
    REQUESTS_PER_MINUTE,
    playwright_api,
)
from tests.integration.harness import ApiServer, WorkerProcess

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
log = structlog.get_logger(__name__)

PAGES = ("playground", "cluster", "batches", "deployments", "keys")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def wait_until(condition, timeout_s: float = 30, what: str = "the condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met within {timeout_s} s"
        await asyncio.sleep(0.2)


# --- shell: landing, sign-in, roles ------------------------------------------------------------------------------


async def test_a_browser_at_the_root_lands_on_the_console_and_api_clients_do_not(console_api: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=console_api.base_url) as http:
        browser_like = await http.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
        assert browser_like.status_code == 307 and browser_like.headers["location"] == "/ui/"
        api_client = await http.get("/", headers={"Accept": "application/json"})
        assert api_client.status_code == 404 and api_client.json()["error"]["code"] == "not_found"
        page = await http.get("/ui/")  # public: the page itself asks for a key
        assert page.status_code == 200 and "<main" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]  # no CDN could load anyway
        script = await http.get("/ui/js/main.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert (await http.get("/metrics/cluster")).status_code == 401  # what the page shows is not public


async def test_sign_in_with_a_key_or_a_password_and_pages_follow_the_role(console, console_api: ApiServer) -> None:
    tab = await console(key=None)
    tab.expected_errors = (HTTP_4XX,)  # the wrong key below is refused (401), as it should be
    page = tab.page
    await page.goto(f"{console_api.base_url}/")
    await page.wait_for_url("**/ui/**")
    dialog = page.locator("#login")
    await dialog.wait_for(state="visible")
    await page.fill("#login-key", "not-a-key")
    await page.click("#login-form button[type=submit]")
    await page.locator("#login-error").filter(has_text="API key").wait_for()  # the API's 401 message
    await tab.screenshot("sign-in")
    await page.fill("#login-key", ADMIN_KEY)
    await page.keyboard.press("Enter")
    await dialog.wait_for(state="hidden")
    assert await visible_pages(page) == list(PAGES)
    assert await page.evaluate("sessionStorage.getItem('inferq.credential')") == ADMIN_KEY

    # A client-role user signs in with email and password (the token route): no admin page, and the API refuses.
    async with httpx.AsyncClient(base_url=console_api.base_url, headers=bearer(ADMIN_KEY)) as http:
        created = await http.post(
            "/admin/users", json={"email": "ada@example.com", "password": "correct horse", "role": "client"}
        )
        assert created.status_code == 201, created.text
    await page.click("#sign-out")
    await dialog.wait_for(state="visible")
    await page.fill("#login-email", "ada@example.com")
    await page.fill("#login-password", "correct horse")

    async def slow_identity(route) -> None:
        # A slow API widens the window in which the console once showed the previous user's name next to the new
        # user's pages (it closed the dialog, then asked who was signed in again); CI caught it once unslowed.
        await asyncio.sleep(0.5)
        await route.continue_()

    await page.route("**/users/me", slow_identity)
    await page.click("#login-form button[type=submit]")
    await dialog.wait_for(state="hidden")
    assert await page.inner_text("#who-name") == "ada@example.com · client"
    await page.unroute("**/users/me")
    assert await visible_pages(page) == ["playground", "batches", "deployments"]
    await page.goto(f"{console_api.base_url}/ui/#/keys")
    await page.locator("main h1", has_text="Keys & users").wait_for()
    assert "client role cannot use this page" in await page.inner_text("main")
    assert await page.locator("#key-list").count() == 0
    status = await page.evaluate("""async () => (await fetch('/admin/keys', {headers: {Authorization:
        'Bearer ' + sessionStorage.getItem('inferq.credential')}})).status""")
    assert status == 403


async def test_a_client_key_sees_no_admin_page(console) -> None:
    tab = await console(key=CLIENT_KEY)
    page = await tab.open("keys")
    assert await visible_pages(page) == ["playground", "batches", "deployments"]
    assert "client role cannot use this page" in await page.inner_text("main")
    page = await tab.open("cluster")
    assert "client role cannot use this page" in await page.inner_text("main")


async def visible_pages(page) -> list[str]:
    await page.locator("#nav li:not([hidden])").first.wait_for()
    return await page.eval_on_selector_all("#nav li:not([hidden])", "items => items.map(i => i.dataset.page)")


# --- playground ----------------------------------------------------------------------------------------------------


async def test_chat_streams_tokens_and_stop_ends_the_generation(console) -> None:
    tab = await console(key=CLIENT_KEY)
    page = await tab.open("playground")
    await page.locator("#model option", has_text=MODEL).wait_for(state="attached")
    await page.fill("#max-tokens", "400")  # ~27 s of sim tokens: only Stop ends it in time
    await page.fill("#seed", "7")
    await page.fill("#prompt", "w5 w6 w7")
    await page.click("#send")
    answer = page.locator(".msg.assistant .content").last
    await wait_until(lambda: words_in(answer, 3), what="three streamed words")
    early = await answer.inner_text()
    await wait_until(lambda: words_in(answer, len(early.split()) + 3), what="more words while streaming")
    assert (await page.inner_text("#ttft")).endswith(" ms")
    await page.click("#stop-generation")
    await page.locator(".msg.assistant.stopped").wait_for()
    stopped = await answer.inner_text()
    await page.wait_for_timeout(1000)
    assert await answer.inner_text() == stopped, "tokens kept arriving after Stop"
    assert len(stopped.split()) < 400
    assert await page.is_enabled("#send") and await page.is_disabled("#stop-generation")

    # A short one runs to its end and reports its usage.
    await page.fill("#max-tokens", "5")
    await page.fill("#prompt", "w8 w9")
    await page.click("#send")
    await page.locator("#chat-status", has_text="Done.").wait_for(timeout=30_000)
    assert "5 completion" in await page.inner_text("#usage")
    assert len((await page.locator(".msg.assistant .content").last.inner_text()).split()) == 5
    await tab.screenshot("playground")


async def words_in(locator, count: int) -> bool:
    return len((await locator.inner_text()).split()) >= count


def refusal(answer: httpx.Response) -> str | None:
    """The API's error message for a request it refused: a 400 before queueing, or the error event of a stream
    that a worker refused after it began (the sim worker cannot enforce structured outputs); None if it served."""
    if answer.status_code == 400:
        return answer.json()["error"]["message"]
    for line in answer.text.splitlines():
        if line.startswith("data: {") and '"error"' in line:
            return json.loads(line.removeprefix("data: "))["error"]["message"]
    return None


@pytest.mark.parametrize(
    ("box", "value"),
    [
        ("#schema", {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}),
        (
            "#tools",
            [
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    },
                }
            ],
        ),
    ],
)
async def test_structured_and_tool_requests_show_what_the_api_answers(
    console, console_api: ApiServer, box: str, value
) -> None:
    tab = await console(key=CLIENT_KEY)
    tab.expected_errors = (HTTP_4XX,)  # if the API refuses the feature, the browser logs the 400
    page = await tab.open("playground")
    await page.locator("#model option", has_text=MODEL).wait_for(state="attached")
    await page.fill("#max-tokens", "4")
    await page.fill(box, json.dumps(value))
    await page.fill("#prompt", "w1 w2")
    async with page.expect_request("**/v1/chat/completions") as request_info:
        await page.click("#send")
    sent = (await request_info.value).post_data_json
    assert sent[box.lstrip("#").replace("schema", "response_format")] is not None
    # What the API answers to exactly that body decides what the page must show.
    async with httpx.AsyncClient(base_url=console_api.base_url, headers=bearer(CLIENT_KEY), timeout=30) as http:
        answer = await http.post("/v1/chat/completions", json=sent)
    message = refusal(answer)
    if message is not None:
        error = page.locator(f"{box}-error")
        await error.filter(has_text=message).wait_for()
        assert await page.get_attribute(box, "aria-invalid") == "true"
        assert await page.locator(".msg.assistant").count() == 0
        if box == "#schema":
            await tab.screenshot("playground-schema-refused")
    else:
        assert answer.status_code == 200, answer.text
        await page.locator("#chat-status", has_text="Done.").wait_for(timeout=30_000)
        assert await page.locator(".msg.assistant .content").last.inner_text()


async def test_copy_as_python_runs_as_shown(console, console_api: ApiServer, tmp_path: Path) -> None:
    tab = await console(key=CLIENT_KEY)
    page = await tab.open("playground")
    await page.locator("#model option", has_text=MODEL).wait_for(state="attached")
    await page.fill("#max-tokens", "3")
    await page.fill("#seed", "3")
    await page.fill("#prompt", "w4 w5")
    await page.click("#copy-curl")
    curl = await page.inner_text("#snippet")
    assert curl.startswith(f"curl -N {console_api.base_url}/v1/chat/completions") and '"max_tokens": 3' in curl
    await page.click("#copy-python")
    script = await page.inner_text("#snippet")
    assert "from openai import OpenAI" in script
    (tmp_path / "snippet.py").write_text(script)
    run = subprocess.run(
        [sys.executable, str(tmp_path / "snippet.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "INFERQ_API_KEY": CLIENT_KEY},
    )
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.split()) == 3  # three sim words, streamed through the SDK


# --- batches -------------------------------------------------------------------------------------------------------


async def test_a_batch_uploaded_through_the_page_completes_and_its_output_downloads(console, tmp_path: Path) -> None:
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"w{i} w{i + 1}"}], "max_tokens": 3},
        }
        for i in range(4)
    ]
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tab = await console(key=CLIENT_KEY)
    page = await tab.open("batches")
    await page.set_input_files("#batch-file", str(source))
    await page.click("#batch-submit")
    row = page.locator("tr[data-batch-id]").first
    await row.wait_for()
    await row.locator(".chip", has_text="completed").wait_for(timeout=60_000)
    assert "4 / 4" in await row.inner_text()
    await tab.screenshot("batches")
    async with page.expect_download() as download_info:
        await row.locator("[data-download=output_file_id]").click()
    download = await download_info.value
    results = [json.loads(line) for line in Path(await download.path()).read_text().splitlines()]
    assert sorted(result["custom_id"] for result in results) == [f"line-{i}" for i in range(4)]
    assert all(result["response"]["status_code"] == 200 for result in results)


async def test_an_upload_the_api_refuses_shows_its_error_next_to_the_field(console, tmp_path: Path) -> None:
    source = tmp_path / "large.jsonl"
    source.write_text("x" * (MAX_FILE_BYTES + 1024))
    tab = await console(key=CLIENT_KEY)
    tab.expected_errors = (HTTP_4XX,)  # the API's 413
    page = await tab.open("batches")
    await page.set_input_files("#batch-file", str(source))
    await page.click("#batch-submit")
    await page.locator("#batch-file-error", has_text=f"limited to {MAX_FILE_BYTES} bytes").wait_for()
    assert await page.get_attribute("#batch-file", "aria-invalid") == "true"


# --- cluster ------------------------------------------------------------------------------------------------------


async def test_the_cluster_page_shows_a_second_worker_within_seconds(
    console, console_api: ApiServer, console_settings: Settings, tmp_path: Path
) -> None:
    tab = await console(key=MONITOR_KEY)
    page = await tab.open("cluster")
    rows = page.locator("#workers tr[data-worker-id]")
    await rows.first.wait_for()
    assert await rows.count() == 1
    assert (await page.inner_text("#nats-state")).startswith("connected")
    second = WorkerProcess(console_settings, tmp_path / "second-worker.log").start()
    started = time.monotonic()
    try:
        await wait_until(lambda: rows_count(rows, 2), timeout_s=30, what="the second worker on the page")
        appeared_after = time.monotonic() - started
        # Load for the charts: both workers generate while the page polls a few times.
        async with httpx.AsyncClient(base_url=console_api.base_url, headers=bearer(CLIENT_KEY), timeout=60) as http:
            load = asyncio.gather(*(steady_load(http, client, seconds=8) for client in range(6)))
            await wait_until(lambda: busy_tokens(page), timeout_s=30, what="tokens/s on the page")
            await page.wait_for_timeout(4000)  # a few more polls, for the charts in the screenshot
            await tab.screenshot("cluster")
            assert await load == [True] * 6
    finally:
        second.stop()
    assert appeared_after < 30
    await wait_until(lambda: rows_count(rows, 1), timeout_s=30, what="the stopped worker leaving the page")


async def steady_load(http: httpx.AsyncClient, client: int, seconds: float) -> bool:
    """Short completions one after another for `seconds`; True if every one succeeded."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        response = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": f"w{client}", "max_tokens": 8, "ignore_eos": True}
        )
        if response.status_code != 200:
            log.warning("steady_load.failed", status=response.status_code, body=response.text[:200])
            return False
    return True


async def rows_count(rows, count: int) -> bool:
    return await rows.count() == count


async def busy_tokens(page) -> bool:
    value = await page.locator(".chart-head b").first.inner_text()
    return value not in ("—", "0.0")


# --- deployments --------------------------------------------------------------------------------------------------


async def test_a_deployment_s_logs_stream_live_and_stop_ends_it(console, agent) -> None:
    tab = await console(key=ADMIN_KEY)
    page = await tab.open("deployments")
    await page.fill("#deploy-model", "sim-deployed")
    await page.click("#deploy-submit")
    row = page.locator("tr[data-deployment-id]", has_text="sim-deployed").first
    await row.wait_for()
    await row.get_by_role("button", name="Logs").click()
    log = page.locator("#deployment-log")
    await log.filter(has_text="[agent] starting: inferq worker --model sim-deployed").wait_for(timeout=30_000)
    await row.locator(".chip", has_text="active").wait_for(timeout=60_000)
    await log.filter(has_text="[agent] active").wait_for(timeout=30_000)  # arrived live, after the stream opened
    assert "pid " in await page.inner_text("#deployment-meta")
    await tab.screenshot("deployments")
    await row.get_by_role("button", name="Stop").click()
    await row.locator(".chip", has_text="stopped").wait_for(timeout=30_000)
    await log.filter(has_text="[agent] stopped").wait_for(timeout=30_000)


async def test_a_bad_model_id_shows_the_api_error_next_to_the_field(console) -> None:
    tab = await console(key=ADMIN_KEY)
    tab.expected_errors = (HTTP_4XX,)
    page = await tab.open("deployments")
    await page.fill("#deploy-model", "Model With Spaces")
    await page.click("#deploy-submit")
    await page.locator("#deploy-model-error", has_text="Deployment failed: invalid model id").wait_for()


# --- keys and users -----------------------------------------------------------------------------------------------


async def test_an_admin_creates_sees_usage_of_and_revokes_a_key(console, console_api: ApiServer) -> None:
    tab = await console(key=ADMIN_KEY)
    page = await tab.open("keys")
    await page.fill("#key-name", "analytics team")
    await page.click("#key-create")
    secret = await page.locator("#new-secret-value").inner_text()
    assert secret.startswith("iq_")
    async with httpx.AsyncClient(base_url=console_api.base_url, headers=bearer(secret)) as http:
        assert (await http.get("/v1/models")).status_code == 200
    row = page.locator("tr[data-key-id]", has_text="analytics team")
    await page.reload()  # the secret is shown once: gone after a reload, the key stays listed
    await row.wait_for()
    assert await page.locator("#new-secret-value").count() == 0
    assert secret not in await page.inner_text("main")
    await wait_until(
        lambda: has_text(row, f"1 / {REQUESTS_PER_MINUTE}"), timeout_s=15, what="the key's use of its minute budget"
    )
    await tab.screenshot("keys")
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await row.get_by_role("button", name="Revoke").click()
    await row.wait_for(state="detached")
    async with httpx.AsyncClient(base_url=console_api.base_url, headers=bearer(secret)) as http:
        assert (await http.get("/v1/models")).status_code == 401


async def has_text(locator, text: str) -> bool:
    return text in await locator.inner_text()


# --- quality bar: every page, phone width, keyboard, dropped connection ---------------------------------------------


async def test_every_page_renders_without_console_errors(console) -> None:
    tab = await console(key=ADMIN_KEY)
    for route in PAGES:
        page = await tab.open(route)
        await page.wait_for_load_state("networkidle")
        await page.wait_for_timeout(500)
    assert tab.errors == []


async def test_every_page_is_usable_at_a_phone_width(console) -> None:
    tab = await console(key=ADMIN_KEY, viewport=PHONE)
    for route in PAGES:
        page = await tab.open(route)
        await page.wait_for_load_state("networkidle")
        overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{route} scrolls sideways by {overflow}px at {PHONE['width']}px"
        link = page.locator(f"#nav a[href='#/{route}']")
        assert await link.is_visible()
    page = await tab.open("playground")
    await page.locator("#model option", has_text=MODEL).wait_for(state="attached")
    await page.fill("#max-tokens", "4")
    await page.fill("#prompt", "w2 w3")
    await page.locator("#send").scroll_into_view_if_needed()
    await page.click("#send")
    await page.locator("#chat-status", has_text="Done.").wait_for(timeout=30_000)
    await tab.screenshot("playground-phone")


async def test_keyboard_only_reaches_the_content_and_chats(console, console_worker: WorkerProcess) -> None:
    tab = await console(key=CLIENT_KEY)
    page = await tab.open("playground")
    await page.locator("#model option", has_text=MODEL).wait_for(state="attached")
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.className") == "skip"
    await page.keyboard.press("Enter")
    assert await page.evaluate("document.activeElement.id") == "main"
    await page.wait_for_timeout(200)  # a hashchange (and a render it caused) would have come by now
    # The skip link moved focus and nothing else: the route is the same, and the page was not rendered again.
    assert await page.evaluate("[location.hash, document.activeElement.id]") == ["#/playground", "main"]
    assert await page.locator("#model option", has_text=MODEL).count() == 1
    for _ in range(40):  # Tab through the page until the message box
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement.id") == "prompt":
            break
    else:
        pytest.fail("Tab never reached the message box")
    outline = await page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none", "no visible focus on the focused field"
    await page.keyboard.type("w1 w2")
    await page.keyboard.press("Control+Enter")
    await answer_streaming(page, console_worker)
    # While it streams, focus sits on Stop: Enter stops it, and focus returns to the message box.
    assert await page.evaluate("document.activeElement.id") == "stop-generation"
    await page.keyboard.press("Enter")
    await page.locator(".msg.assistant.stopped").wait_for()
    assert await page.evaluate("document.activeElement.id") == "prompt"


async def answer_streaming(page, worker: WorkerProcess) -> None:
    """Until the assistant's answer shows a word. On a timeout, what the page and the worker said: CI once saw
    no answer within 45 s here, with no 4xx/5xx in the browser, and nothing else to go on."""
    try:
        await page.locator(".msg.assistant .content", has_text="w").wait_for()
    except playwright_api.TimeoutError:
        shown = await page.evaluate(
            """() => ({status: document.getElementById('chat-status')?.textContent,
                       errors: [...document.querySelectorAll('.error')].map((e) => e.textContent).filter(Boolean),
                       messages: [...document.querySelectorAll('.msg')].map((m) => m.textContent)})"""
        )
        pytest.fail(f"no answer streamed; the page showed {shown}; the worker logged:\n{worker.log_tail(40)}")


async def test_a_dropped_connection_shows_a_banner_and_recovers(console) -> None:
    tab = await console(key=MONITOR_KEY)
    tab.expected_errors = (OFFLINE,)  # chromium logs each fetch made while offline
    page = await tab.open("cluster")
    await page.locator("#workers tr[data-worker-id]").first.wait_for()
    banner = page.locator("#banner")
    assert await banner.is_hidden()
    await page.context.set_offline(True)
    await banner.filter(has_text="Connection to the API lost").wait_for(timeout=15_000)
    before = await page.inner_text("#cluster-updated")
    await page.context.set_offline(False)
    await banner.wait_for(state="hidden", timeout=15_000)
    await wait_until(lambda: changed(page, "#cluster-updated", before), timeout_s=15, what="fresh data after")


async def changed(page, selector: str, before: str) -> bool:
    return await page.inner_text(selector) != before
