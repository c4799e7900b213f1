"""The page, driven in a real browser the way a person uses it (at a phone's width), against
the real gateway, the real Temporal dev server and the scripted model: a reply read as it is
written, an approval clicked (also with the worker killed right after), an edit in the form
made from the tool's schema, a refusal and an interrupt from the message box, a rejection
made with the keyboard alone, a run of another tenant that never shows, a cancel, sign-out."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
from collections.abc import AsyncIterator
from enum import StrEnum
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright, expect
from pydantic import BaseModel, Field

from keel.activities.registry import Agent
from keel.activities.tools import ToolContext, tool
from keel.client.api import AgentClient
from keel.demo.agent import Ledger
from keel.policy_file import parse_policy
from keel.testing.model_server.rules import RuleSet
from keel.workflows.models import AgentStatus, ApprovalMode, ApprovalPolicy
from tests.conftest import Harness
from tests.page_site import Site, site
from tests.policies import policy_data
from tests.rules import STORY, TEST_RULES
from tests.test_crash import killable_worker

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")  # Debian's, never a download
pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="the page's tests drive Debian's Chromium: apt-get install -y chromium",
    ),
    pytest.mark.timeout(180),
]
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PHONE = {"width": 375, "height": 740}
WAIT_MS = 60_000  # what a person waits for a run's next step (a bound, never a sleep)
# dana and sam of tenant acme, gail of globex; alice approves in acme (tests/policies.py)
POLICY = policy_data()

expect.set_options(timeout=WAIT_MS)


class Carrier(StrEnum):
    POST = "post"
    COURIER = "courier"


class ShipArgs(BaseModel):
    carrier: Carrier
    boxes: int = Field(ge=1, le=5)
    insured: bool = False
    note: str = ""


@tool(side_effects=True)
async def ship(args: ShipArgs, ctx: ToolContext) -> str:
    """Send boxes (a side effect: one outbox row per idempotency key)."""
    ledger: Ledger = ctx.resources
    body = args.model_dump_json()
    r = await asyncio.to_thread(ledger.email, "dock", "ship", body, ctx.idempotency_key)
    return json.dumps(r)


# every field kind the edit form makes: a choice (an enum, by reference), a whole number
# with bounds, a yes/no, free text
SHIPPER = Agent(
    name="shipper",
    instructions="You ship.",
    tools=[ship],
    approvals={"ship": ApprovalPolicy(mode=ApprovalMode.ALWAYS, reason="a person sends boxes")},
)
SHIP_IT = {
    "name": "ship",
    "when": {"last_role": "user", "last_user": "(?i)^ship it"},
    "reply": {"tool_calls": [{"name": "ship", "arguments": {"carrier": "post", "boxes": 2}}]},
}


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        await b.close()


@pytest_asyncio.fixture
async def open_page(browser: Browser) -> AsyncIterator:
    """Pages at a phone's width, each in its own browser profile (its own sign-in)."""
    contexts = []

    async def opened(s: Site, user: str) -> Page:
        context = await browser.new_context(base_url=s.url, viewport=PHONE)
        contexts.append(context)
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        await page.goto("/")
        await page.get_by_label("Access token").fill(s.tokens[user])
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_text(f"Signed in as {user}")).to_be_visible()
        return page

    yield opened
    for context in contexts:
        await context.close()


async def open_run(page: Page, run: str) -> None:
    """Follow the run's link from the list, as a person does."""
    await page.get_by_role("link", name="Runs", exact=True).click()
    await page.get_by_role("link", name=re.compile(re.escape(run))).click()
    await expect(page.get_by_role("heading", name=f"Run {run}")).to_be_visible()


async def start(h: Harness, user: str, agent: str, message: str) -> str:
    """A run started by `user` from a client of their own that knows the policy (so the
    run carries their tenant)."""
    client = AgentClient(h.client, h.settings, policy=parse_policy(POLICY), as_user=user)
    return await client.start(agent, message)


def notice(page: Page, text: str):
    """What a status line of the page says (a live region)."""
    return page.get_by_role("status").filter(has_text=text)


async def fits(page: Page) -> bool:
    """Nothing on the page needs a sideways scroll (at a phone's width)."""
    return bool(await page.evaluate("document.documentElement.scrollWidth <= innerWidth"))


def conversation(page: Page):
    return page.get_by_role("log")


def status(page: Page):
    """The run's status line (a live region)."""
    return page.get_by_role("status").filter(has_text="Status:")


async def test_a_reply_shows_as_it_is_written(harness: Harness, open_page, tmp_path: Path) -> None:
    async with harness.running(), site(harness, tmp_path, ["dana"], POLICY) as s:
        page = await open_page(s, "dana")
        await page.get_by_label("Agent").fill("calc")
        await page.get_by_label("First message").fill("tell a story")
        await page.get_by_role("button", name="Start run").click()
        await expect(page.get_by_role("heading", name=re.compile("^Run "))).to_be_visible()
        await expect(conversation(page).get_by_text("tell a story")).to_be_visible()
        await harness.model.wait_held("story")
        # the model is held mid-reply: its first words are on the page, the rest is not
        await expect(conversation(page).get_by_text("Once upon a time")).to_be_visible()
        assert harness.model.held("story") == 1
        await expect(conversation(page).get_by_text("writing")).to_be_visible()
        await expect(conversation(page)).not_to_contain_text("the sailors slept")
        harness.model.release("story")
        await expect(conversation(page).get_by_text(STORY)).to_be_visible()
        await expect(status(page)).to_contain_text("Status: completed")
        await expect(conversation(page).get_by_text("Run ended")).to_be_visible()
        assert await fits(page)


async def test_an_approval_clicked_charges_once(
    harness: Harness, open_page, tmp_path: Path
) -> None:
    async with harness.running(), site(harness, tmp_path, ["alice", "dana"], POLICY) as s:
        run = await start(harness, "dana", "shop", "charge 30")
        # dana sees her run's approval, but may not decide it: the run's own reason says so
        dana = await open_page(s, "dana")
        await dana.get_by_role("link", name=re.compile("Approvals")).click()
        card = dana.get_by_role("article", name=re.compile(re.escape(run)))
        await card.get_by_role("button", name="Approve", exact=True).click()
        await expect(card.get_by_role("alert")).to_have_text(
            "'dana' may not decide this call (allowed: alice, bob)"
        )
        page = await open_page(s, "alice")
        await page.get_by_role("link", name=re.compile("Approvals")).click()
        card = page.get_by_role("article", name=re.compile(re.escape(run)))
        await expect(card.get_by_text("charges above 20 need approval")).to_be_visible()
        await expect(card.get_by_text("30", exact=True)).to_be_visible()
        await card.get_by_role("button", name="Approve", exact=True).click()
        await expect(notice(page, f"Approved charge on run {run}.")).to_be_visible()
        # its card leaves the inbox (others' runs on this server may still wait there)
        await expect(card).to_have_count(0)
        await open_run(page, run)
        await expect(status(page)).to_contain_text("Status: completed")
        await expect(conversation(page).get_by_text("charge: approved by alice.")).to_be_visible()
    refunds = harness.ledger.rows("refunds")
    assert [r["amount"] for r in refunds] == [30]


async def test_an_approval_survives_the_worker_killed_after_the_click(
    harness: Harness, open_page, tmp_path: Path
) -> None:
    async with killable_worker(harness) as proc, site(harness, tmp_path, ["alice"], POLICY) as s:
        run = await start(harness, "dana", "shop", "charge 30")
        page = await open_page(s, "alice")
        await open_run(page, run)
        card = page.get_by_role("article", name="charge")
        await card.get_by_role("button", name="Approve", exact=True).click()
        await expect(notice(page, f"Approved charge on run {run}.")).to_be_visible()
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        async with harness.running():
            await expect(status(page)).to_contain_text("Status: completed")
            result = await harness.agents.result(run, timeout=60)
    assert result.status == AgentStatus.COMPLETED
    refunds = harness.ledger.rows("refunds")
    assert [r["amount"] for r in refunds] == [30]


async def test_an_edit_in_the_generated_form(harness: Harness, open_page, tmp_path: Path) -> None:
    async with harness.running(), site(harness, tmp_path, ["alice"], POLICY) as s:
        run = await start(harness, "dana", "shop", "charge 30")
        page = await open_page(s, "alice")
        await page.get_by_role("link", name=re.compile("Approvals")).click()
        card = page.get_by_role("article", name=re.compile(re.escape(run)))
        await card.get_by_role("button", name="Edit…").click()
        amount = card.get_by_label("amount")
        await expect(amount).to_have_value("30")
        await expect(card.get_by_label("note")).to_have_value("test")
        assert await fits(page)
        await amount.fill("0")
        await card.get_by_role("button", name="Approve with these arguments").click()
        await expect(card.get_by_text("Must be more than 0.")).to_be_visible()
        await expect(amount).to_be_focused()
        await amount.fill("25")
        await card.get_by_label("note").fill("partial refund")
        await card.get_by_role("button", name="Approve with these arguments").click()
        await expect(
            notice(page, f"Approved charge on run {run} with edited arguments.")
        ).to_be_visible()
        result = await harness.agents.result(run, timeout=60)
    assert result.status == AgentStatus.COMPLETED
    refunds = harness.ledger.rows("refunds")
    assert [(r["amount"], r["reason"]) for r in refunds] == [(25, "partial refund")]


async def test_the_edit_form_follows_the_tools_schema(
    harness: Harness, open_page, tmp_path: Path
) -> None:
    harness.model.set_rules(
        RuleSet.from_dict({**TEST_RULES, "rules": [SHIP_IT, *TEST_RULES["rules"]]})
    )
    async with harness.running([SHIPPER]), site(harness, tmp_path, ["alice"], POLICY) as s:
        run = await start(harness, "dana", "shipper", "ship it")
        page = await open_page(s, "alice")
        await open_run(page, run)
        card = page.get_by_role("article", name="ship")
        await card.get_by_role("button", name="Edit…").click()
        carrier = card.get_by_role("combobox", name="carrier")
        await expect(carrier.get_by_role("option", selected=True)).to_have_text("post")
        await carrier.select_option(label="courier")
        boxes = card.get_by_label("boxes")
        await expect(boxes).to_have_value("2")
        await boxes.fill("9")
        insured = card.get_by_role("checkbox", name="insured")
        await expect(insured).not_to_be_checked()
        await insured.check()
        await card.get_by_role("button", name="Approve with these arguments").click()
        await expect(boxes).to_be_focused()
        await expect(card.get_by_text("less than or equal to 5")).to_be_visible()
        await boxes.fill("3")
        await card.get_by_role("button", name="Approve with these arguments").click()
        await expect(
            notice(page, f"Approved ship on run {run} with edited arguments.")
        ).to_be_visible()
        await expect(status(page)).to_contain_text("Status: completed")
    (sent,) = harness.ledger.rows("outbox")
    assert json.loads(sent["body"]) == {
        "carrier": "courier",
        "boxes": 3,
        "insured": True,
        "note": "",
    }


async def test_an_interrupt_from_the_message_box(
    harness: Harness, open_page, tmp_path: Path
) -> None:
    async with harness.running(), site(harness, tmp_path, ["dana"], POLICY) as s:
        run = await start(harness, "dana", "calc", "think slowly")
        await harness.model.wait_held("slow")  # the model call is in flight, held
        page = await open_page(s, "dana")
        await open_run(page, run)
        message = page.get_by_label("Message", exact=True)
        # refused while the turn is in flight: the run's own reason shows, the text stays
        await message.fill("say hello")
        await page.get_by_label("Reject").check()
        await page.get_by_role("button", name="Send message").click()
        await expect(page.get_by_role("alert")).to_have_text(
            "a turn is in flight and this message's policy is reject"
        )
        await expect(message).to_have_value("say hello")
        await page.get_by_label("Interrupt").check()
        await page.get_by_role("button", name="Send message").click()
        await expect(notice(page, "Message queued (interrupt).")).to_be_visible()
        await expect(conversation(page).get_by_text("Hello!")).to_be_visible()
        await expect(status(page)).to_contain_text("Status: completed")
        harness.model.release("slow")
        state = await harness.agents.get_state(run)
    said = [(m.role, m.content) for m in state.transcript if m.role != "system"]
    assert said == [("user", "think slowly"), ("user", "say hello"), ("assistant", "Hello!")]


async def test_a_rejection_made_with_the_keyboard_alone(
    harness: Harness, open_page, tmp_path: Path
) -> None:
    async with harness.running(), site(harness, tmp_path, ["alice"], POLICY) as s:
        run = await start(harness, "dana", "shop", "charge 30")
        page = await open_page(s, "alice")
        await page.get_by_role("link", name=re.compile("Approvals")).focus()
        await page.keyboard.press("Enter")
        await expect(page.get_by_role("heading", name="Approvals")).to_be_focused()
        card = page.get_by_role("article", name=re.compile(re.escape(run)))
        await card.get_by_role("button", name="Reject…").focus()
        await page.keyboard.press("Enter")
        reason = card.get_by_label("Reason for rejecting")
        await expect(reason).to_be_focused()
        await page.keyboard.type("over the limit")
        await page.keyboard.press("Tab")
        await expect(card.get_by_role("button", name="Reject", exact=True)).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(notice(page, f"Rejected charge on run {run}.")).to_be_visible()
        await open_run(page, run)
        await expect(
            conversation(page).get_by_text("The tool reported: Rejected by alice: over the limit")
        ).to_be_visible()
        await expect(status(page)).to_contain_text("Status: completed")
    assert harness.ledger.rows("refunds") == []


async def test_another_tenants_run_never_shows(harness: Harness, open_page, tmp_path: Path) -> None:
    async with (
        harness.worker(policy=parse_policy(POLICY)),
        site(harness, tmp_path, ["gail", "alice"], POLICY) as s,
    ):
        theirs = await start(harness, "dana", "guarded", "charge 30")
        mine = await start(harness, "gail", "calc", "add 1 and 2")
        await harness.agents.result(mine, timeout=30)
        page = await open_page(s, "gail")
        await expect(page.get_by_role("link", name=re.compile(re.escape(mine)))).to_be_visible()
        await expect(page.get_by_role("link", name=re.compile(re.escape(theirs)))).to_have_count(0)
        await page.get_by_role("link", name=re.compile("Approvals")).click()
        await expect(page.get_by_text("Nothing waits for a decision.")).to_be_visible()
        # nor by its address: the page says what the API says, and shows nothing of it
        await page.goto(f"/#/runs/{theirs}")
        await expect(page.get_by_role("alert")).to_contain_text(theirs)
        await expect(page.get_by_text("charge 30")).to_have_count(0)
        await expect(page.get_by_role("button", name="Send message")).to_have_count(0)
        # one of the tenant sees it, and its approval
        alice = await open_page(s, "alice")
        await expect(alice.get_by_role("link", name=re.compile(re.escape(theirs)))).to_be_visible()
        # signing out ends the session for good: a reload asks for the token again
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_label("Access token")).to_be_focused()
        await page.reload()
        await expect(page.get_by_label("Access token")).to_be_visible()
        await expect(page.get_by_role("link", name=re.compile(re.escape(mine)))).to_have_count(0)
        # alice, who sees it, cancels it from its page
        await open_run(alice, theirs)
        await alice.get_by_role("button", name="Cancel run").click()
        await alice.get_by_role("button", name="Yes, cancel the run").click()
        await expect(status(alice)).to_contain_text("Status: cancelled")
        await expect(conversation(alice).get_by_text("cancelled", exact=True)).to_be_visible()
        await expect(alice.get_by_role("button", name="Send message")).to_be_disabled()
        summary = await harness.agents.summary(theirs)
    assert summary.temporal_status == "canceled"  # Temporal's own word
