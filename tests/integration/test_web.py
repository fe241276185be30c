"""The draw-a-digit page in a real browser (Chromium driven by Playwright), against the real
stack through nginx: digits drawn with the mouse, a file uploaded, errors shown in words, and
nothing loaded from anywhere but this host."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from playwright.sync_api import Browser, FilePayload, Playwright, Request, Route, sync_playwright

from harness.mnist_slice import load_test_slice
from harness.strokes import strokes
from tests.helpers import digit_image, png_bytes
from tests.integration.stack import Stack

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "web-page.png"
NO_DIGIT = "\u2013"  # the page's dash where no digit is shown
EXTENT = 0.8  # of the canvas, as a person draws (and as harness.strokes measured)


def chromium_path() -> str | None:
    """The system's Chromium (CHROMIUM, else the usual names); None: Playwright's own build."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        yield launch(playwright)


def launch(playwright: Playwright) -> Browser:
    path = chromium_path()
    # Chromium's sandbox needs an unprivileged user: off when the tests run as root.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    try:
        return playwright.chromium.launch(executable_path=path, args=args)
    except Exception as exc:
        pytest.fail(
            f"no Chromium to run the page in ({exc}): install it (Debian: apt-get install "
            "chromium; make test does) or set CHROMIUM to its path"
        )


class Visit:
    """One page of the site, with a record of what it asked for and what went wrong in it."""

    def __init__(self, browser: Browser, stack: Stack, **context: Any) -> None:
        self.origin = f"http://127.0.0.1:{stack.port}"
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.outside: list[str] = []
        self.script_errors: list[str] = []
        self.policy_violations: list[str] = []
        self.context.route("**/*", self._only_this_host)
        self.page.on("pageerror", lambda error: self.script_errors.append(str(error)))
        self.page.on("console", self._console)
        self.page.goto(self.origin + "/")

    def _only_this_host(self, route: Route, request: Request) -> None:
        if request.url.startswith(self.origin + "/"):
            route.continue_()
        else:
            self.outside.append(request.url)
            route.abort()

    def _console(self, message: Any) -> None:
        if "Content Security Policy" in message.text or "Refused to" in message.text:
            self.policy_violations.append(message.text)

    def clean(self) -> None:
        assert self.outside == []
        assert self.script_errors == []
        assert self.policy_violations == []

    def draw(self, digit: int) -> dict[str, Any]:
        """Draw the digit's strokes with the mouse; the server's answer to the whole drawing,
        once the page shows it."""
        box = self.page.locator("#pad").bounding_box()
        assert box is not None
        mouse = self.page.mouse
        drawn = strokes(digit)
        # Each lift of the pen sends the drawing so far: the answer to the whole drawing is the
        # answer to the last request sent, whenever the earlier ones' answers arrive.
        sent: list[Request] = []

        def on_request(request: Request) -> None:
            if request.url.endswith("/predict"):
                sent.append(request)

        self.page.on("request", on_request)
        for stroke in drawn:
            points = [
                (
                    box["x"] + ((1 - EXTENT) / 2 + x * EXTENT) * box["width"],
                    box["y"] + ((1 - EXTENT) / 2 + y * EXTENT) * box["height"],
                )
                for x, y in stroke
            ]
            mouse.move(*points[0])
            mouse.down()
            for point in points[1:]:
                mouse.move(*point)
            mouse.up()
        for _ in range(200):
            if len(sent) >= len(drawn):
                break
            self.page.wait_for_timeout(50)
        self.page.remove_listener("request", on_request)
        assert len(sent) == len(drawn), f"{len(sent)} requests for {len(drawn)} strokes"
        response = sent[-1].response()
        assert response is not None
        body: dict[str, Any] = response.json()
        body["_served_by"] = response.headers.get("x-served-by", "")
        # This answer's own words: an earlier stroke's answer may have shown the same digit.
        said = f"Read as {body['digit']}, confidence {body['confidence'] * 100:.1f} %"
        self.page.locator("#status").filter(has_text=said).wait_for()
        self.wait_shown(str(body["digit"]))
        return body

    def wait_shown(self, digit: str) -> None:
        self.page.wait_for_function(
            "digit => document.getElementById('digit').textContent === digit", arg=digit
        )

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(browser: Browser, stack: Stack) -> Iterator[Visit]:
    page = Visit(browser, stack)
    yield page
    page.close()


def test_the_ten_digits_drawn_with_a_mouse_are_read(visit: Visit, stack: Stack) -> None:
    model = json.loads(stack.request("GET", "/model")[2])
    read = {}
    for digit in range(10):
        if digit:
            visit.page.click("#clear")
        answer = visit.draw(digit)
        read[digit] = answer["digit"]
        # What the page shows is what the server said, all of it.
        bars = visit.page.locator("#bars li")
        assert bars.count() == 10
        top = bars.nth(answer["digit"])
        assert "top" in (top.get_attribute("class") or "")
        said = f"Read as {answer['digit']}, confidence {answer['confidence'] * 100:.1f} %"
        assert visit.text("#status") == said
        assert visit.text("#model-version") == model["version"] == answer["model_version"]
        assert visit.text("#served-by") == answer["_served_by"] != ""
        assert visit.text("#round-trip").endswith(" ms")
    print(f"\ndrawn -> read: {read}")
    assert sum(digit == got for digit, got in read.items()) >= 9, read
    visit.clean()


def test_undo_takes_back_the_last_stroke_and_reads_again(visit: Visit) -> None:
    visit.draw(4)  # two strokes
    with visit.page.expect_response(lambda r: r.url.endswith("/predict")) as answer:
        visit.page.click("#undo")
    assert answer.value.status == 200
    visit.page.click("#undo")
    assert visit.text("#status") == "Nothing drawn yet."
    assert visit.page.locator("#undo").is_disabled()
    visit.clean()


def test_a_picked_file_is_classified(visit: Visit) -> None:
    images, labels = load_test_slice()
    with visit.page.expect_response(lambda r: r.url.endswith("/predict")) as answer:
        visit.page.set_input_files(
            "#file",
            files=[
                FilePayload(name="digit.png", mimeType="image/png", buffer=png_bytes(images[0]))
            ],
        )
    assert answer.value.status == 200
    visit.wait_shown(str(labels[0]))
    visit.clean()


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("notes.txt", b"not an image at all", "not an image the service reads"),
        ("huge.png", b"\x89PNG\r\n\x1a\n" + b"\0" * (5 << 20), "too large"),
    ],
)
def test_the_stacks_errors_are_shown_in_words(
    visit: Visit, name: str, content: bytes, said: str
) -> None:
    with visit.page.expect_response(lambda r: r.url.endswith("/predict")) as answer:
        visit.page.set_input_files(
            "#file",
            files=[FilePayload(name=name, mimeType="application/octet-stream", buffer=content)],
        )
    assert answer.value.status in (413, 415)
    status = visit.page.locator("#status")
    status.filter(has_text=said).wait_for()
    assert "error" in (status.get_attribute("class") or "")
    assert visit.text("#digit") == NO_DIGIT
    visit.clean()


@pytest.mark.parametrize(
    ("status", "said"),
    [(429, "Too many requests from this address. Try again in 3 s."), (503, "Try again in 3 s.")],
)
def test_refusals_are_shown_with_when_to_retry(visit: Visit, status: int, said: str) -> None:
    # The stack refuses only under load or with a rate limit set: here the browser is given
    # the refusal, to see how the page tells it.
    visit.page.route(
        "**/predict",
        lambda route: route.fulfill(
            status=status,
            headers={"Retry-After": "3", "Content-Type": "application/json"},
            body=json.dumps({"detail": "overloaded: retry shortly"}),
        ),
    )
    visit.page.set_input_files(
        "#file",
        files=[FilePayload(name="d.png", mimeType="image/png", buffer=png_bytes(digit_image()))],
    )
    visit.page.locator("#status").filter(has_text=said).wait_for()
    visit.clean()


def test_at_phone_width_it_fits_and_every_control_is_labelled(
    browser: Browser, stack: Stack
) -> None:
    phone = Visit(browser, stack, viewport={"width": 360, "height": 740}, has_touch=True)
    try:
        page = phone.page
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        box = page.locator("#pad").bounding_box()
        assert box is not None
        assert box["width"] <= 340
        for name in ("Undo stroke", "Clear", "Read again"):
            assert page.get_by_role("button", name=name).count() == 1
        assert page.get_by_label("Open image…").count() == 1
        assert page.get_by_role("status").count() == 1
        phone.draw(7)
        # Keyboard: every control is reached with Tab once there is something to act on.
        reached = []
        for _ in range(8):
            page.keyboard.press("Tab")
            reached.append(page.evaluate("document.activeElement.id"))
        assert {"undo", "clear", "again", "file"} <= set(reached), reached
        phone.clean()
    finally:
        phone.close()


def page_files_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted((REPO / "web").rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def test_the_screenshot_in_the_readme_is_current(visit: Visit) -> None:
    visit.page.set_viewport_size({"width": 900, "height": 640})
    visit.draw(7)
    shot = visit.page.screenshot(full_page=True)
    assert Image.open(io.BytesIO(shot)).size[0] == 900
    # Taken anew whenever the page's files change (their hash is kept in the PNG), not on every
    # run: the replica and round trip it shows differ each time.
    current = page_files_hash()
    if not SCREENSHOT.exists() or Image.open(SCREENSHOT).info.get("web-files") != current:
        meta = PngInfo()
        meta.add_text("web-files", current)
        Image.open(io.BytesIO(shot)).save(SCREENSHOT, pnginfo=meta, optimize=True)
    visit.clean()


def test_the_page_is_served_with_a_strict_policy_and_revalidated(stack: Stack) -> None:
    for path in ("/", "/static/app.js", "/static/style.css"):
        status, headers, _ = stack.request("GET", path)
        assert status == 200, path
        policy = headers["content-security-policy"]
        assert "default-src 'none'" in policy
        assert "script-src 'self'" in policy
        assert "'unsafe-inline'" not in policy
        assert headers["cache-control"] == "no-cache"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers.get("etag")
        connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
        connection.request("GET", path, headers={"If-None-Match": headers["etag"]})
        again = connection.getresponse()
        again.read()
        connection.close()
        assert again.status == 304, path
