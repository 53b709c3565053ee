"""The web console in a real browser: Debian's chromium driven by Playwright (its own browser download is not
used), against a real stack shared by the module: nats-server, the API with auth on, one sim worker (no model),
and a node agent in this process for deployments. Set INFERQ_SCREENSHOTS=docs/console to write the pages'
screenshots for docs/console.md."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker.embedded import EmbeddedNatsServer
from common.settings import Settings
from ops.agent import Agent
from tests.integration.harness import ApiServer, WorkerProcess, wait_healthy
from tests.integration.test_deployments import running_agent

playwright_api = pytest.importorskip("playwright.async_api")

ADMIN_KEY, CLIENT_KEY, MONITOR_KEY = "console-admin-secret", "console-client-secret", "console-monitor-secret"
MODEL = "sim-chat"
MAX_FILE_BYTES = 64 * 1024  # small, so a test can upload a file the API refuses
REQUESTS_PER_MINUTE = 10_000  # every key's budget: the cluster test's load must not meet a 429
LAPTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str | None:
    return os.environ.get("INFERQ_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="package")
def console_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    with EmbeddedNatsServer(tmp_path_factory.mktemp("console-nats"), port=-1) as server:
        yield server


@pytest.fixture(scope="package")
def console_settings(console_nats: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        nats_url=console_nats.url,
        data_dir=tmp_path_factory.mktemp("console-data"),
        engine="sim",
        model=MODEL,
        served_model_name=MODEL,
        sim_tokens_per_s=15.0,
        max_num_seqs=4,
        auth="on",
        api_keys=[ADMIN_KEY, f"client:{CLIENT_KEY}", f"monitor:{MONITOR_KEY}"],
        log_format="json",
        queue_timeout_s=20.0,
        deploy_start_timeout_s=60.0,
        deploy_probe_timeout_s=30.0,
        max_file_bytes=MAX_FILE_BYTES,
        rate_limit_requests_per_minute=REQUESTS_PER_MINUTE,
    )


@pytest.fixture(scope="package")
def console_worker(console_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    process = WorkerProcess(console_settings, tmp_path_factory.mktemp("console-logs") / "worker.log").start()
    yield process
    process.stop()


@pytest.fixture(scope="package")
async def console_api(console_settings: Settings, console_worker: WorkerProcess) -> AsyncIterator[ApiServer]:
    server = ApiServer(console_settings).start()
    await wait_healthy(server.base_url, console_worker)
    yield server
    server.stop()


@pytest.fixture(scope="package")
async def agent(console_settings: Settings) -> AsyncIterator[Agent]:
    async with running_agent(console_settings) as running:
        yield running


@pytest.fixture(scope="package")
async def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    async with playwright_api.async_playwright() as playwright:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start
        browser = await playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        await browser.close()


@dataclass
class ConsolePage:
    """A browser tab on the console, signed in with `key`, recording every console error and page exception."""

    page: playwright_api.Page
    base_url: str
    errors: list[str] = field(default_factory=list)
    # Chromium logs each non-2xx fetch ("Failed to load resource: … status of 400") and each fetch that finds no
    # network as a console error: a test that provokes those on purpose names their prefixes here.
    expected_errors: tuple[str, ...] = ()

    def unexpected_errors(self) -> list[str]:
        return [error for error in self.errors if not error.startswith(self.expected_errors or ("\0",))]

    async def open(self, route: str) -> playwright_api.Page:
        await self.page.goto(f"{self.base_url}/ui/#/{route}")
        await self.page.wait_for_selector("main h1")
        return self.page

    async def screenshot(self, name: str) -> None:
        """Into $INFERQ_SCREENSHOTS (the docs' images) when set."""
        target = os.environ.get("INFERQ_SCREENSHOTS")
        if target:
            Path(target).mkdir(parents=True, exist_ok=True)
            path = Path(target) / f"{name}.png"
            await self.page.screenshot(path=str(path), full_page=True)
            shrink(path)


def shrink(path: Path) -> None:
    """A 256-colour palette: a third of the size, and nothing a page of flat colours and text loses. Skipped where
    Pillow is missing (it is not a dependency; the screenshots are only for the docs)."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


OpenConsole = Callable[..., Awaitable[ConsolePage]]


@pytest.fixture
async def console(browser, console_api: ApiServer) -> AsyncIterator[OpenConsole]:
    """`await console(key=..., viewport=...)` → a fresh signed-in tab; at the end, no console errors allowed."""
    pages: list[ConsolePage] = []

    async def open_console(key: str | None = ADMIN_KEY, viewport: dict | None = None) -> ConsolePage:
        context = await browser.new_context(viewport=viewport or LAPTOP, accept_downloads=True, color_scheme="light")
        if key is not None:  # as if the user had signed in earlier in this tab
            await context.add_init_script(f"sessionStorage.setItem('inferq.credential', {key!r})")
        context.set_default_timeout(45_000)  # generous: the machine running the tests may be busy
        page = await context.new_page()
        console_page = ConsolePage(page, console_api.base_url)
        page.on("console", lambda msg: msg.type == "error" and console_page.errors.append(msg.text))
        page.on("pageerror", lambda exc: console_page.errors.append(str(exc)))
        pages.append(console_page)
        return console_page

    yield open_console
    for console_page in pages:
        await console_page.page.context.close()
    errors = [error for console_page in pages for error in console_page.unexpected_errors()]
    assert not errors, f"console errors: {errors}"


HTTP_4XX = "Failed to load resource: the server responded with a status of 4"
OFFLINE = "Failed to load resource: net::"
