"""The dashboard in a real headless Chromium (selenium + the distribution's chromedriver),
against a live server with API keys on while one user trains: the page asks for a key,
refuses a wrong one, then shows that user's adapters (and not the other user's) with loss
curves that gain points as training goes on. The browser logs no errors; a screenshot is
saved to the test's tmp folder (its path is printed, even without ``-s``).

Not skipped when Chromium is missing: it fails and names the package to install.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from client_example import TinkerClient

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ALICE, BOB = "tml-alice-key-1", "tml-bob-key-22"
INSTALL = "apt-get install -y chromium chromium-driver"
WAIT_S = 20.0
# A few short exchanges, so the curves look like training rather than one memorised line.
CHATS = [
    [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}],
]


def _find(candidates: list[str], env: str) -> str | None:
    """An executable: ``$env`` if set, else the first candidate found (name or path)."""
    for name in filter(None, [os.environ.get(env), *candidates]):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -r requirements-dev.txt")
    chromium = _find(["chromium", "chromium-browser", "google-chrome"], "CHROMIUM")
    driver_path = _find(["chromedriver", "/usr/lib/chromium/chromedriver"], "CHROMEDRIVER")
    if not chromium or not driver_path:
        pytest.fail(f"Chromium and its driver are needed for this test; install them with: {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,1180", "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium then never tries to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class Trainer(threading.Thread):
    """Alice trains her adapters round-robin until stopped, a little slower than the page
    polls, so each poll sees the curves grow."""

    def __init__(self, url: str, model_ids: list[str], rates: list[float]) -> None:
        super().__init__(daemon=True)
        self.url, self.model_ids, self.rates = url, model_ids, rates
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.steps = 0

    def run(self) -> None:
        try:
            with TinkerClient(self.url, api_key=ALICE) as client:
                while not self.stop.is_set():
                    for model_id, lr in zip(self.model_ids, self.rates, strict=True):
                        client.train_step(model_id, [CHATS[self.steps % len(CHATS)]], learning_rate=lr)
                    self.steps += 1
                    self.stop.wait(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _points_in(driver, model_id: str) -> int:
    """Points of the adapter's row sparkline, counted from the SVG polyline itself."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        row = driver.find_element("css selector", f'tr[data-adapter="{model_id}"]')
        polyline = row.find_elements("css selector", "svg.spark polyline")
        return len(polyline[0].get_attribute("points").split()) if polyline else 0
    except (NoSuchElementException, StaleElementReferenceException):
        return -1


def _wait(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def _next_poll(browser) -> None:
    """Wait for the page's next poll of /dashboard/state (its "updated" clock changes)."""
    before = browser.find_element("id", "updated").text
    _wait(lambda: browser.find_element("id", "updated").text != before, "the next poll")


def test_dashboard_shows_live_training(start_server, browser, tmp_path, capsys):
    server = start_server(THINKER_API_KEYS=f"{ALICE},{BOB}", MAX_WORKERS="2")
    with TinkerClient(server.url, api_key=ALICE) as alice, TinkerClient(server.url, api_key=BOB) as bob:
        alice_models = [alice.create_lora(rank=r, seed=r) for r in (8, 16, 32)]
        bob_model = bob.create_lora(rank=4)
        for model_id in alice_models:
            alice.train_step(model_id, CHATS[:1], learning_rate=5e-3)
    trainer = Trainer(server.url, alice_models, rates=[2e-3, 5e-3, 1e-2])
    trainer.start()
    try:
        browser.get(server.url + "/")
        # Keys on: the page is public, but asks for a key before it shows anything.
        key_input = _wait(lambda: browser.find_element("id", "key-input").is_displayed()
                          and browser.find_element("id", "key-input"), "the key form")
        key_input.send_keys("tml-wrong-key-0")
        browser.find_element("css selector", "#key-form button[type=submit]").click()
        _wait(lambda: "not accepted" in browser.find_element("id", "key-error").text, "the rejected-key message")
        browser.find_element("id", "key-input").send_keys(ALICE)
        browser.find_element("css selector", "#key-form button[type=submit]").click()

        watched = alice_models[-1]
        first = _wait(lambda: max(_points_in(browser, watched), 0), f"the row of {watched} with a loss curve")
        grown = _wait(lambda: _points_in(browser, watched) >= first + 3 and _points_in(browser, watched),
                      "the loss curve to gain points")
        assert grown >= first + 3
        # Every adapter of Alice's has its row and the big chart plots one with axes; Bob's is absent.
        rows = [r.get_attribute("data-adapter") for r in browser.find_elements("css selector", "#adapters tbody tr")]
        assert set(rows) == set(alice_models) and bob_model not in rows
        chart = browser.find_element("css selector", "#loss-chart polyline.curve")
        assert int(chart.get_attribute("data-points")) >= 2
        assert browser.find_elements("css selector", "#loss-chart .axis text")
        assert browser.find_elements("css selector", "#throughput-chart rect.bar")
        assert browser.find_elements("css selector", "#requests tbody tr")
        assert "Live" in browser.find_element("id", "status").text

        # A fuller curve for the picture, then the screenshot.
        _wait(lambda: _points_in(browser, watched) >= 16, "a longer curve for the screenshot")
        _next_poll(browser)  # one more poll so every chart shows the same moment
    finally:
        trainer.stop.set()
        trainer.join(timeout=30)
    assert trainer.error is None, trainer.error
    # The whole page in one picture: a viewport as tall as the document (the charts redraw
    # for the resize, then settle).
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 1440, "height": height, "deviceScaleFactor": 1, "mobile": False}
    )
    _next_poll(browser)  # the charts redrawn for the new size
    shot = tmp_path / "dashboard.png"  # under pytest's tmp folders, never in the checkout
    assert browser.save_screenshot(str(shot))
    with capsys.disabled():
        print(f"\ndashboard screenshot: {shot}")
    assert shot.stat().st_size > 10_000

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert not errors, errors  # a script error or a blocked (CSP) load would show here
