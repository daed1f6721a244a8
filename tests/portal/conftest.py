"""Portal fixtures: a control plane whose Stripe checkout returns to its own portal, Debian's Chromium driven
by Playwright (no browser download), and `Visit`, which checks every page it shows for console errors and
accessibility problems (axe-core, vendored in tests/portal/vendor) and saves a screenshot of it."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from shared.embedded import free_port
from shared.settings import Settings
from tests.conftest import Server, settings_env, start_server
from tests.control_plane.conftest import (  # noqa: F401  (fixtures used by the portal tests)
    CONTROL_PLANE_OVERRIDES,
    Portal,
    local_stripe,
    local_stripe_server,
)

CHROMIUM = os.environ.get("RR_TEST_CHROMIUM", "/usr/bin/chromium")
AXE = (Path(__file__).parent / "vendor" / "axe.min.js").read_text()
# WCAG 2.1 A and AA rules, as axe-core tags them.
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]


@pytest.fixture(scope="session")
def portal_server(settings: Settings) -> Iterator[Server]:
    """A control plane of its own: Stripe's way back is its root, which leads into the portal; webhook
    endpoints may be on loopback (the test receivers)."""
    port = free_port()
    env = settings_env(settings, control_plane_port=port, checkout_return_url=f"http://127.0.0.1:{port}/",
                       webhook_allow_insecure=True, **CONTROL_PLANE_OVERRIDES)
    server = start_server([sys.executable, "-m", "control_plane.main"], env, port, "/readyz", "portal")
    yield server
    server.stop()


@pytest_asyncio.fixture
async def api(portal_server: Server, settings: Settings) -> AsyncIterator[Portal]:
    """The JSON API of the same control plane (to set up members and the like)."""
    async with httpx.AsyncClient(timeout=20.0) as http:
        yield Portal(portal_server, http, settings)


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Screenshots of every page the tests visit: RR_SCREENSHOT_DIR if set, else pytest's tmp dir."""
    wanted = os.environ.get("RR_SCREENSHOT_DIR")
    if wanted:
        path = Path(wanted)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("portal-screenshots")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not shutil.which(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
    return CHROMIUM


@pytest_asyncio.fixture(scope="session")
async def browser(chromium_path: str):
    from playwright.async_api import async_playwright

    playwright = await async_playwright().start()
    chromium = await playwright.chromium.launch(executable_path=chromium_path, headless=True,
                                                args=["--no-sandbox", "--disable-gpu"])
    yield chromium
    await chromium.close()
    await playwright.stop()


class Visit:
    """One browser context (one user) on the portal. `check(name)` after each page it shows: no console
    errors or uncaught exceptions (a CSP violation is one), no axe-core violations, and a screenshot."""

    def __init__(self, page, base_url: str, screenshots: Path, who: str) -> None:
        self.page = page
        self.base_url = base_url
        self.screenshots = screenshots
        self.who = who
        self.problems: list[str] = []
        page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("dialog", lambda d: d.accept())  # the confirm() of destructive forms

    async def goto(self, path: str) -> None:
        await self.page.goto(self.base_url + path)

    async def check(self, name: str, *, error_status: int | None = None) -> None:
        """`error_status`: the page is an error page of this status (the browser logs that as an error)."""
        page = self.page
        await page.wait_for_load_state("load")
        file = self.screenshots / f"{self.who}-{re.sub(r'[^a-z0-9-]+', '-', name.lower())}.png"
        await page.screenshot(path=str(file), full_page=True)
        await page.evaluate(AXE + "\n;undefined")  # by DevTools, so the page's CSP rightly doesn't allow it
        result = await page.evaluate("""tags => axe.run(document, {runOnly: {type: 'tag', values: tags}})
            .then(r => r.violations.map(v => v.id + ': ' + v.help + ' — ' +
                v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(', ')))""", AXE_TAGS)
        problems, self.problems = self.problems, []
        if error_status is not None:
            problems = [p for p in problems if f"status of {error_status}" not in p]
        assert not result, f"{name}: accessibility violations: {result}"
        overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        wide = await page.evaluate("""[...document.querySelectorAll('body *')].filter(e =>
            e.getBoundingClientRect().right > window.innerWidth + 1 && !e.closest('.scroll'))
            .slice(0, 8).map(e => e.tagName + '.' + e.className + ':' + Math.round(e.getBoundingClientRect().right))""")
        assert overflow <= 1, f"{name}: the page is {overflow}px wider than the screen: {wide}"
        assert not problems, f"{name}: {problems}"

    async def csrf_token(self) -> str:
        return await self.page.locator("input[name=_csrf_token]").first.get_attribute("value")


@pytest_asyncio.fixture
async def visit_factory(browser, portal_server: Server, screenshot_dir: Path):
    contexts = []

    async def open_visit(who: str, *, mobile: bool = False) -> Visit:
        viewport = {"width": 390, "height": 844} if mobile else {"width": 1280, "height": 900}
        context = await browser.new_context(viewport=viewport)
        contexts.append(context)
        return Visit(await context.new_page(), portal_server.url, screenshot_dir, who)

    yield open_visit
    for context in contexts:
        await context.close()
