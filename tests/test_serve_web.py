"""The web chat page in real headless Chromium (Debian's chromium, driven by Playwright; no browser download):
type a message, watch the reply stream in, give a thumbs-up, find the preference record on disk, take a
screenshot, and check that the conversation survives a reload (localStorage).

Skips, saying why, when Playwright or /usr/bin/chromium is missing (`apt-get install -y chromium`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from lmstack.serving.app import Settings, create_app  # noqa: E402
from lmstack.serving.engine import Engine  # noqa: E402
from lmstack.serving.testing import ServerThread  # noqa: E402

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
KEY = "web-key"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (Debian: apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = Engine("smollm2-135m-instruct", {}, None, max_batch=2, context=512)
    engine.load()
    if engine.state != "ok":
        pytest.skip(f"SmolLM2 unavailable: {engine.detail}")
    feedback = tmp_path_factory.mktemp("web") / "feedback.jsonl"
    with ServerThread(create_app(engine, Settings(api_keys=[KEY], max_tokens=64, feedback_path=feedback))) as srv:
        srv.feedback, srv.engine = feedback, engine
        yield srv
    engine.shutdown()


def test_chat_page_streams_and_saves_a_thumbs_up(browser, server, tmp_path):
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.fill("input[name=k]", KEY)  # the key form: sets the cookie and reloads into the chat
    page.click("button")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    assert page.locator("#model option").all_text_contents() == ["smollm2-135m-instruct"]
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "input")
    page.fill("#max_tokens", "40")
    page.dispatch_event("#max_tokens", "change")

    # Count the text the reply shows while it streams: several growing states before the end.
    page.evaluate("""() => { window.__seen = new Set();
        new MutationObserver(() => { const b = document.querySelector('.msg.assistant .body');
            if (b) window.__seen.add(b.textContent); })
        .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#input", "Write a Python function that adds two numbers.")
    page.click("#send")
    page.wait_for_selector(".msg.assistant [data-action=thumbs-up]", timeout=120_000)  # shown when done
    reply = page.locator(".msg.assistant .body").inner_text()
    assert reply.strip()
    assert page.evaluate("() => window.__seen.size") >= 3  # it grew piece by piece
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

    page.click(".msg.assistant [data-action=thumbs-up]")
    page.wait_for_selector(".msg.assistant [data-action=thumbs-up].on", timeout=10_000)
    records = [json.loads(line) for line in server.feedback.read_text().splitlines()]
    assert len(records) == 1 and records[0]["rating"] == 1 and records[0]["kind"] == "rating"
    assert records[0]["prompt"][-1] == {"role": "user", "content": "Write a Python function that adds two numbers."}
    stored = page.evaluate("() => JSON.parse(localStorage.getItem('lmstack.chat.v1')).messages")
    assert records[0]["chosen"] == stored[1]["content"] and stored[1]["rating"] == 1
    if "```" in stored[1]["content"]:  # Markdown: a fenced block became <pre><code>
        assert page.locator(".msg.assistant pre code").count() >= 1

    # A vs B: two sampled answers side by side; preferring B saves a chosen/rejected pair.
    page.click("#ab")
    page.wait_for_selector(".pair [data-action=prefer-b]", timeout=120_000)
    page.click(".pair [data-action=prefer-b]")
    page.wait_for_selector(".pair [data-action=prefer-b].on", timeout=10_000)
    pair = json.loads(server.feedback.read_text().splitlines()[-1])
    answers = page.evaluate("() => JSON.parse(localStorage.getItem('lmstack.chat.v1')).messages[1].pair")
    assert pair["kind"] == "pairwise" and pair["chosen"] == answers[1] and pair["rejected"] == answers[0]

    # Regenerate replaces the last reply; Stop ends a reply mid-stream and frees its batch row on the server.
    page.click("#regen")
    page.wait_for_selector("#stop:disabled", timeout=120_000)
    assert page.locator(".msg.assistant").count() == 1 and page.locator(".pair").count() == 0
    page.fill("#max_tokens", "64")
    page.dispatch_event("#max_tokens", "change")
    page.fill("#input", "Tell me a long story about a dragon.")
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant')[1]?.textContent.length > 40",
                           timeout=120_000)
    page.click("#stop")
    page.wait_for_selector("#status:has-text('stopped')", timeout=10_000)
    for _ in range(100):
        if server.engine.scheduler.load == (0, 0):
            break
        page.wait_for_timeout(50)
    assert server.engine.scheduler.load == (0, 0)

    page.reload()  # the conversation is kept in the browser
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator(".msg.user .body").first.inner_text().startswith("Write a Python function")
    assert page.locator(".msg.user").count() == 2
    assert (tmp_path / "chat.png").stat().st_size > 10_000
    assert not errors, errors
    context.close()


def test_phone_width_wrong_key_and_a_cut_reply(browser, server):
    """Issue 13 at a phone's viewport (390 x 844): a wrong key says so; the chat column keeps the width (it
    shrank to ~100 px beside the settings, with Stop clipped); a reply cut by max_tokens says it was cut."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    assert page.locator("#refused").count() == 0  # no key given yet: no complaint
    page.fill("input[name=k]", "wrong-key")
    page.click("button")
    page.wait_for_selector("#refused", timeout=10_000)
    assert "not accepted" in page.locator("#refused").inner_text()
    page.fill("input[name=k]", KEY)
    page.click("button")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)

    def box(selector: str) -> dict:
        b = page.locator(selector).bounding_box()
        assert b is not None, f"{selector} is not shown"
        return b

    assert box("#log")["width"] >= 370  # the whole width, the settings folded away
    for selector in ("#send", "#stop", "#input"):
        b = box(selector)
        assert b["x"] >= 0 and b["x"] + b["width"] <= 390 and b["width"] >= 30, (selector, b)
    assert box("#input")["width"] >= 150
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways
    assert not page.locator("#max_tokens").is_visible()
    page.click("#settings")  # the settings open over the full width, and fold away again
    assert box("#max_tokens")["width"] >= 300
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "input")
    page.fill("#max_tokens", "3")
    page.dispatch_event("#max_tokens", "change")
    page.click("#settings")
    assert not page.locator("#max_tokens").is_visible()

    page.fill("#input", "Tell me a long story about a dragon.")
    page.click("#send")
    page.wait_for_selector(".msg.assistant .cut", timeout=60_000)
    assert "max tokens limit (3)" in page.locator(".msg.assistant .cut").inner_text()
    assert "cut at max tokens" in page.locator("#status").inner_text()
    page.screenshot(path="/tmp/lmstack-chat-phone.png", full_page=True)
    page.reload()  # the mark is kept with the conversation
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator(".msg.assistant .cut").count() == 1

    page.evaluate("() => { document.cookie = 'lmstack_key=stale; path=/'; }")  # the key changed under the page
    page.fill("#input", "hi")
    page.click("#send")
    page.wait_for_selector("#status:has-text('did not accept the API key')", timeout=10_000)
    assert not errors, errors
    context.close()
