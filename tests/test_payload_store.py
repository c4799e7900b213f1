"""With KEEL_PAYLOAD_DIR, transcripts leave the history: the bytes each step adds stay flat."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from keel.client.api import AgentClient
from keel.config import Settings
from keel.demo.agent import Ledger
from keel.storage import close_s3_clients
from keel.testing.model_server import ScriptedModelServer
from keel.workflows.models import CALL_MODEL, AgentStatus
from tests.conftest import Harness, wait_for


async def model_input_sizes(client: Client, run: str) -> list[int]:
    """The bytes each model step's input put into the history, in step order."""
    history = await client.get_workflow_handle(run).fetch_history()
    return [
        e.activity_task_scheduled_event_attributes.input.ByteSize()
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == CALL_MODEL
    ]


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local S3-compatible server (moto) with one bucket, through the AWS environment."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "keel")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "keel")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3").create_bucket(Bucket="keel-payloads")
    try:
        yield "keel-payloads"
    finally:
        server.stop()


def stored_objects(store: str, tmp_path: Path) -> int:
    if store == "s3":
        import boto3

        listing = boto3.client("s3").list_objects_v2(Bucket="keel-payloads")
        return int(listing.get("KeyCount", 0))
    return sum(1 for p in (tmp_path / "payloads").rglob("*") if p.is_file())


@pytest.mark.parametrize("store", ["directory", "s3"])
async def test_transcript_leaves_the_history(
    env: WorkflowEnvironment,
    model: ScriptedModelServer,
    ledger: Ledger,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    store: str,
) -> None:
    inline = Harness(env, model, ledger)
    stored = Harness(env, model, ledger)
    stored.settings = Settings(
        task_queue=stored.settings.task_queue,
        payload_dir=str(tmp_path / "payloads") if store == "directory" else None,
        payload_s3_bucket=request.getfixturevalue("s3_bucket") if store == "s3" else None,
        payload_threshold=1024,
    )
    stored.client = await Client.connect(
        env.client.service_client.config.target_host,
        data_converter=stored.settings.data_converter(),
    )
    stored.agents = AgentClient(stored.client, stored.settings)

    sizes = {}
    for name, h in (("inline", inline), ("stored", stored)):
        async with h.running():
            run = await h.start("six", "loop forever")
            result = await h.agents.result(run, timeout=60)
            state = await h.agents.get_state(run)
        assert result.status == AgentStatus.BUDGET_EXHAUSTED and state.step == 6
        assert len(state.transcript) == 2 + 2 * 6  # the full transcript, read back
        sizes[name] = await model_input_sizes(h.client, run)

    inline_sizes, stored_sizes = sizes["inline"], sizes["stored"]
    assert inline_sizes[-1] > inline_sizes[0] + 500  # inline: grows with the conversation
    assert max(stored_sizes) < 1024  # stored: a reference per step, whatever the length
    assert max(stored_sizes[2:]) - min(stored_sizes[2:]) < 64  # flat
    assert stored_objects(store, tmp_path) >= 6
    await close_s3_clients()


async def test_driver_refuses_claims_it_did_not_make(tmp_path: Path) -> None:
    from temporalio.api.common.v1 import Payload
    from temporalio.converter import StorageDriverClaim, StorageDriverRetrieveContext

    from keel.storage import LocalDirectoryDriver, PayloadNotFound

    driver = LocalDirectoryDriver(tmp_path)
    ctx = StorageDriverRetrieveContext()
    (claim,) = await driver.store(None, [Payload(data=b"x" * 100)])  # type: ignore[arg-type]
    (back,) = await driver.retrieve(ctx, [claim])
    assert back.data == b"x" * 100
    for bad in ("/etc/hostname", "../../etc/passwd", "", "ab"):
        (null,) = await driver.retrieve(ctx, [StorageDriverClaim(claim_data={"sha256": bad})])
        assert null.data == b"null"
    missing = StorageDriverClaim(claim_data={"sha256": "0" * 64})
    try:
        await driver.retrieve(ctx, [missing])
        raise AssertionError("a missing payload must raise")
    except PayloadNotFound as e:
        assert "KEEL_PAYLOAD_DIR" in str(e)


async def test_a_conversation_past_two_megabytes_keeps_going_with_storage(
    env: WorkflowEnvironment, model: ScriptedModelServer, ledger: Ledger, tmp_path: Path
) -> None:
    """With payload storage on, no 2 MB limit bounds a conversation: every message is taken,
    each model request carries the latest turns that fit, the record keeps everything."""
    h = Harness(env, model, ledger)
    h.settings = Settings(task_queue=h.settings.task_queue, payload_dir=str(tmp_path / "p"))
    h.client = await Client.connect(
        env.client.service_client.config.target_host,
        data_converter=h.settings.data_converter(),
    )
    h.agents = AgentClient(h.client, h.settings)
    async with h.running():
        run = await h.start("chat-long", "say hello")
        await h.agents.result(run, timeout=30)
        receipts = []
        for i in range(25):  # 25 × 100,000 characters, each echoed back: 5 MB
            receipts.append(await h.agents.send_message(run, f"{i:02d}" + "x" * 99_997))
            await wait_for(lambda n=i: _answered(h, run, n), timeout=60)
        state = await h.agents.get_state(run)
        runs = [w async for w in h.client.list_workflows(f"WorkflowId = '{run}'")]
        await h.agents.cancel(run)
    assert {r.status for r in receipts} == {"delivered"}
    assert len(state.transcript) == 3 + 2 * 25 and state.status == AgentStatus.IDLE
    assert sum(len(m.content or "") for m in state.transcript) > 2_000_000
    last = model.requests()[-1]["body"]["messages"]
    assert sum(len(m["content"] or "") for m in last) <= 1_250_000
    assert "earlier messages of this conversation are left out" in last[0]["content"]
    assert last[-1]["content"].startswith("24")  # the latest message is always sent
    assert len(runs) >= 2  # it continued as new on the way, carrying 5 MB by reference


async def _answered(h: Harness, run: str, n: int) -> object:
    s = await h.agents.get_state(run)
    done = s.status == AgentStatus.IDLE and (s.final_answer or "").startswith(f"You said: {n:02d}")
    return s if done else None
