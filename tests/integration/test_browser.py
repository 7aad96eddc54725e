"""The demo page in headless Chromium, against a real gateway and simulator.

Playwright drives the Debian ``chromium`` package (never a downloaded browser).
What the page shows is checked against what the simulator is known to answer
(``answer_tokens``) and against the simulator's own request log: one upstream
call for a burst, a reset when Stop is pressed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.sim.content import answer_tokens
from gateway.sim.profile import SimProfile
from tests.integration.conftest import subscribed, upstream_held
from tests.integration.severing_proxy import severing_proxy

async_api = pytest.importorskip("playwright.async_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
#: Slow enough to watch an answer grow (30 tokens over ~0.5 s), fast enough for CI.
PROFILE = SimProfile(ttft_ms=50, itl_ms=15, tokens=30, ttft_jitter_ms=0, itl_jitter_ms=0)
DESKTOP = {"width": 1100, "height": 760}
PHONE = {"width": 390, "height": 844}
#: Generous: a noisy 2-core machine, but a stuck page must not hang the run.
WAIT_MS = 10_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed")


def expected(prompt: str, tokens: int = PROFILE.tokens) -> str:
    return "".join(answer_tokens([{"role": "user", "content": prompt}], tokens))


def milliseconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d)?) ms", text)
    assert match, f"not a time in ms: {text!r}"
    return float(match.group(1))


@pytest.fixture
async def page() -> AsyncIterator[async_api.Page]:
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = await browser.new_context(viewport=DESKTOP)
            page = await context.new_page()
            page.set_default_timeout(WAIT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield page
            assert errors == [], f"uncaught errors in the page: {errors}"
            await context.close()
        finally:
            await browser.close()


async def open_page(page: async_api.Page, base_url: str, prompt: str) -> None:
    await page.goto(base_url + "/")
    # chat.js marks the document once its handlers are attached.
    await page.wait_for_selector("html[data-ready='true']", state="attached")
    await page.fill("#prompt", prompt)


async def screenshot(page: async_api.Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / name), full_page=True)


# Runs in the page at every poll: keeps each new, longer text of the first
# answer seen while that pane is still streaming; done once there are three.
GROWING_SNAPSHOTS = """
() => {
  const pane = document.querySelector('#pane-0');
  const text = document.querySelector('#answer-0')?.textContent ?? '';
  const seen = (window.__snapshots ??= []);
  if (pane?.dataset.state === 'streaming' && text.length > (seen.at(-1)?.length ?? 0)) {
    seen.push(text);
  }
  return seen.length >= 3 ? seen : null;
}
"""


async def test_the_answer_streams_in_with_its_timings(gateway_factory, page):
    gateway = await gateway_factory(sim_profile=PROFILE)
    prompt = "How does a gateway stream tokens?"
    answer = expected(prompt)
    await open_page(page, gateway.url, prompt)
    await page.press("#prompt", "Enter")

    snapshots = await (await page.wait_for_function(GROWING_SNAPSHOTS, polling=10)).json_value()
    # Three ever longer texts, each a strict beginning of the answer, all seen
    # before the stream's done event: the page renders incrementally.
    assert [len(s) for s in snapshots] == sorted({len(s) for s in snapshots})
    for snapshot in snapshots:
        assert answer.startswith(snapshot) and len(snapshot) < len(answer)

    await page.wait_for_selector("#status[data-state='done']")
    assert await page.text_content("#answer-0") == answer
    assert await page.get_attribute("#pane-0", "data-state") == "done"
    assert await page.text_content("#status-role") == "leader"
    assert await page.text_content("#status-subscribers") == "1"
    first_byte = milliseconds(await page.text_content("#status-first-byte") or "")
    ttft_client = milliseconds(await page.text_content("#status-ttft-client") or "")
    ttft_server = milliseconds(await page.text_content("#status-ttft-server") or "")
    milliseconds(await page.text_content("#status-queue-wait") or "")
    # The ping comes before the first token; no token before the model's 50 ms.
    assert first_byte <= ttft_client
    assert ttft_client >= PROFILE.ttft_ms and ttft_server >= PROFILE.ttft_ms
    assert await page.is_hidden("#error")
    assert len(gateway.sim.log.records) == 1
    await screenshot(page, "browser-answer-desktop.png")


async def test_stop_cancels_and_the_upstream_is_reset(gateway_factory, page):
    gateway = await gateway_factory(sim_profile=PROFILE)
    prompt = "A very long answer, please [sim tokens=500 itl_ms=20]"
    await open_page(page, gateway.url, prompt)
    await page.click("#send")
    await page.wait_for_function("document.querySelector('#answer-0')?.textContent.length > 0")
    assert await page.is_disabled("#send")

    await page.click("#stop")
    (record,) = await gateway.sim.log.wait_for(1, outcome="reset", timeout=WAIT_MS / 1000)
    assert record.tokens_sent < 500
    await page.wait_for_selector("#status[data-state='stopped']")
    assert await page.get_attribute("#pane-0", "data-state") == "stopped"
    shown = await page.text_content("#answer-0") or ""
    assert shown and expected(prompt, 500).startswith(shown)
    assert await page.is_hidden("#error")
    assert await page.is_enabled("#send") and await page.is_disabled("#stop")


async def test_a_burst_is_one_upstream_call_with_a_leader_and_followers(gateway_factory, page):
    gateway = await gateway_factory(sim_profile=dataclasses.replace(PROFILE, max_concurrency=1))
    prompt = "Explain coalescing to me"
    await open_page(page, gateway.url, prompt)
    assert await page.input_value("#burst-count") == "5"
    # The upstream answers once the page's five requests are all in.
    async with upstream_held(gateway):
        await page.click("#burst")
        await subscribed(gateway, 5)

    await page.wait_for_selector("#status[data-state='done']")
    panes = page.locator("[data-testid='answer-pane']")
    assert await panes.count() == 5
    assert await page.locator("[data-testid='answer']").all_text_contents() == [expected(prompt)] * 5
    roles = [await panes.nth(i).get_attribute("data-role") for i in range(5)]
    assert sorted(roles) == ["follower"] * 4 + ["leader"]
    assert await page.text_content("#status-role") == "1 leader · 4 follower"
    assert len(gateway.sim.log.records) == 1
    await screenshot(page, "browser-burst-desktop.png")
    await page.set_viewport_size(PHONE)
    await screenshot(page, "browser-burst-phone.png")


async def test_a_gateway_with_api_keys_answers_the_key_typed_in(gateway_factory, page):
    gateway = await gateway_factory(sim_profile=PROFILE, gateway_api_keys=("sk-demo",))
    prompt = "Who may ask?"
    await open_page(page, gateway.url, prompt)
    await page.click("#send")
    await page.wait_for_selector("#status[data-state='error']")
    assert (await page.text_content("#error") or "").startswith("Error (invalid_api_key): ")

    await page.fill("#api-key", "sk-demo")
    await page.click("#send")
    await page.wait_for_selector("#status[data-state='done']")
    assert await page.text_content("#answer-0") == expected(prompt)
    assert await page.is_hidden("#error")
    assert len(gateway.sim.log.records) == 1


async def test_an_upstream_failure_is_shown_plainly(gateway_factory, page):
    gateway = await gateway_factory(sim_profile=PROFILE)
    await open_page(page, gateway.url, "This breaks [sim reset_after=3]")
    await page.set_viewport_size(PHONE)
    await page.click("#send")

    await page.wait_for_selector("#status[data-state='error']")
    message = await page.text_content("#error") or ""
    assert message.startswith("Error (upstream_stream_reset): ")
    assert await page.text_content("#pane-0 [data-testid='pane-note']") == "error: upstream_stream_reset"
    assert await page.get_attribute("#pane-0", "data-state") == "error"
    await screenshot(page, "browser-error-phone.png")


async def test_a_refusal_is_shown_as_the_answer(gateway_factory, page):
    """A refusal streams in ``refusal`` deltas, not ``text``: the pane shows its words."""
    gateway = await gateway_factory(sim_profile=PROFILE)
    prompt = "Something it will not do [sim refusal=1]"
    await open_page(page, gateway.url, prompt)
    await page.click("#send")

    await page.wait_for_selector("#status[data-state='done']")
    assert expected(prompt) in (await page.text_content("#pane-0") or "")
    refusal = page.locator("#pane-0 [data-testid='refusal']")
    assert await refusal.is_visible() and await refusal.text_content() == expected(prompt)
    # No "…" placeholder for a text answer that will never come.
    assert await page.is_hidden("#answer-0")
    assert await page.is_hidden("#error")


async def test_a_key_http_cannot_carry_is_an_error_at_once(gateway_factory, page):
    """A key pasted with a non-breaking hyphen cannot go in a header: fetch()
    rejects it like a network failure, but the page says so without retrying."""
    gateway = await gateway_factory(sim_profile=PROFILE, gateway_api_keys=("sk-demo",))
    await open_page(page, gateway.url, "Who may ask?")
    await page.fill("#api-key", "sk\u2011demo")
    await page.click("#send")

    await page.wait_for_selector("#status[data-state='error']")
    message = await page.text_content("#error") or ""
    assert message.startswith("Error (invalid_header): the Authorization header ")
    assert "demo" not in message
    assert await page.is_enabled("#send") and await page.is_enabled("#api-key")
    assert len(gateway.sim.log.records) == 0


async def test_the_answers_are_a_live_region_busy_while_streaming(gateway_factory, page):
    """Screen readers announce the answer: #answers is aria-live, and aria-busy
    while streaming so the answer is read once whole, not word by word."""
    gateway = await gateway_factory(sim_profile=PROFILE)
    await open_page(page, gateway.url, "Read it to me [sim tokens=100 itl_ms=20]")
    assert await page.get_attribute("#answers", "aria-live") == "polite"
    assert await page.get_attribute("#answers", "aria-busy") in (None, "false")

    await page.click("#send")
    await page.wait_for_function("document.querySelector('#answer-0')?.textContent.length > 0")
    assert await page.get_attribute("#answers", "aria-busy") == "true"
    await page.wait_for_selector("#status[data-state='done']")
    assert await page.get_attribute("#answers", "aria-busy") == "false"


async def test_a_dropped_connection_restarts_the_answer_and_says_so(gateway_factory, page):
    """The network drops mid-answer: the gateway sees its only client leave and
    resets the upstream, so the resume finds no live stream and the answer
    starts again. The pane shows the whole answer and says why it restarted."""
    gateway = await gateway_factory(sim_profile=PROFILE)
    prompt = "Over a bad network [sim tokens=80 itl_ms=20]"
    async with severing_proxy(gateway.url) as proxy:
        await open_page(page, proxy.url, prompt)
        await page.click("#send")
        await page.wait_for_function("document.querySelector('#answer-0')?.textContent.length > 20")
        proxy.sever()

        await page.wait_for_selector("#status[data-state='done']")
        assert await page.text_content("#answer-0") == expected(prompt, 80)
        note = page.locator("#pane-0 [data-testid='pane-note']")
        assert await note.is_visible()
        assert await note.text_content() == "the stream had ended; the answer started again"
        assert [r.outcome for r in gateway.sim.log.records] == ["reset", "complete"]


async def test_a_stream_cancelled_by_the_server_shows_stopped(gateway_factory, page):
    """POST /v1/requests/{id}/cancel ends the stream with finish_reason
    "cancelled": the answer is cut short, and the status line says so."""
    gateway = await gateway_factory(sim_profile=PROFILE)
    prompt = "Cut me off [sim tokens=500 itl_ms=20]"
    await open_page(page, gateway.url, prompt)
    async with page.expect_response("**/v1/stream") as response_info:
        await page.click("#send")
    request_id = (await response_info.value).headers["x-request-id"]
    await page.wait_for_function("document.querySelector('#answer-0')?.textContent.length > 0")

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gateway.url}/v1/requests/{request_id}/cancel") as response:
            assert response.status == 202
    await page.wait_for_selector("#status:not([data-state='streaming'])")
    assert await page.get_attribute("#pane-0", "data-state") == "stopped"
    assert await page.text_content("#pane-0 [data-testid='pane-note']") == "cancelled by the server"
    assert await page.text_content("#status-state") == "stopped"
    assert await page.get_attribute("#status", "data-state") == "stopped"


async def test_a_pane_that_ends_before_its_first_token_says_how(gateway_factory, page):
    """No token, so no role to show: the pane's header says the run failed or
    was stopped instead of still "waiting"."""
    gateway = await gateway_factory(sim_profile=PROFILE)
    await open_page(page, gateway.url, "Refused at once [sim fail_status=500]")
    await page.click("#send")
    await page.wait_for_selector("#status[data-state='error']")
    assert await page.get_attribute("#pane-0", "data-state") == "error"
    assert await page.text_content("#pane-0 [data-testid='pane-role']") == "failed"

    await page.fill("#prompt", "Too slow to wait for [sim ttft_ms=5000]")
    await page.click("#send")
    await subscribed(gateway, 1)
    await page.click("#stop")
    await page.wait_for_selector("#status[data-state='stopped']")
    assert await page.get_attribute("#pane-0", "data-state") == "stopped"
    assert await page.text_content("#pane-0 [data-testid='pane-role']") == "stopped"


async def test_enter_in_the_burst_count_sends_a_burst(gateway_factory, page):
    """Enter in the count field does what the Burst button beside it does:
    that many requests, not the form's one."""
    gateway = await gateway_factory(sim_profile=PROFILE)
    prompt = "Three at once"
    await open_page(page, gateway.url, prompt)
    await page.fill("#burst-count", "3")
    await page.press("#burst-count", "Enter")

    await page.wait_for_selector("#status[data-state='done']")
    answers = page.locator("[data-testid='answer']")
    assert await answers.all_text_contents() == [expected(prompt)] * 3


FOCUSED = "document.activeElement.id || document.activeElement.localName"


async def test_the_keyboard_focus_moves_to_stop_and_back_to_send(gateway_factory, page):
    """A control disabled while focused would drop the focus to <body>: it
    moves to Stop when a run starts and to Send when the run ends, so Enter
    goes on working without a mouse."""
    gateway = await gateway_factory(sim_profile=PROFILE)
    await open_page(page, gateway.url, "A very long answer, please [sim tokens=500 itl_ms=20]")
    await page.focus("#send")
    await page.keyboard.press("Enter")
    await page.wait_for_function("document.querySelector('#answer-0')?.textContent.length > 0")
    assert await page.evaluate(FOCUSED) == "stop"
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#status[data-state='stopped']")
    assert await page.evaluate(FOCUSED) == "send"

    # From the burst count to Stop; at the run's own end, back to Send.
    await page.fill("#prompt", "Two short ones")
    await page.fill("#burst-count", "2")
    await page.press("#burst-count", "Enter")
    await page.wait_for_selector("#status[data-state='streaming']")
    assert await page.evaluate(FOCUSED) == "stop"
    await page.wait_for_selector("#status[data-state='done']")
    assert await page.evaluate(FOCUSED) == "send"
