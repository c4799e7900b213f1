"""Encrypted payloads: the history holds ciphertext only, the client and the codec server
decode it, keys rotate without losing runs, and every way to misconfigure it fails clearly."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import BaseModel
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from keel.activities.registry import Agent
from keel.activities.tools import ToolContext, tool
from keel.client.api import AgentClient
from keel.codec import (
    ENCODING,
    KEY_ID,
    EncryptionCodec,
    KeyRing,
    PayloadDecryptError,
    UnknownKeyError,
    new_key,
)
from keel.codec_server import SESSION_COOKIE, CodecServer
from keel.config import Settings, SettingsError
from keel.demo.agent import Ledger
from keel.plugin import build_worker
from keel.testing.model_server import RuleSet, ScriptedModelServer
from keel.workflows.models import AgentStatus, ApprovalMode, ApprovalPolicy, RunState
from tests.conftest import Harness, wait_for
from tests.rules import TEST_RULES
from tests.test_cli import keel as keel_cli

TEMPORAL = str(Path(sys.executable).parent / "temporal")
KEY_A, KEY_B = new_key("key-a"), new_key("key-b")
TOKEN = "test-token-" + "x" * 24

# What must never be readable in a history: the agent's instructions, the prompt, an
# argument only the tool call carries, the tool's result and the final answer each hold a
# word of their own.
PROMPT_WORD, ARGUMENT_WORD = "otter-lantern-4471", "quartz-ember-9902"
RESULT_WORD, ANSWER_WORD = "walrus-9902", "heron-sapphire-5120"
INSTRUCTIONS = "You file notes for lynx-cobalt-3318."
SECRETS = ("lynx-cobalt-3318", PROMPT_WORD, ARGUMENT_WORD, RESULT_WORD, ANSWER_WORD)
PROMPT = f"file note: {PROMPT_WORD}"


class NoteArgs(BaseModel):
    text: str
    label: str


@tool
async def file_note(args: NoteArgs, ctx: ToolContext) -> str:
    """File a note under a label."""
    return json.dumps({"ref": "walrus-" + args.label.rsplit("-", 1)[-1]})


@tool(max_attempts=1)
async def shred_note(args: NoteArgs, ctx: ToolContext) -> str:
    """Shred a note (always fails, quoting its argument)."""
    raise RuntimeError(f"cannot shred {args.text}")


NOTES = Agent(name="notes", instructions=INSTRUCTIONS, tools=[file_note, shred_note])
NOTES_APPROVED = Agent(
    name="notes-approved",
    instructions=INSTRUCTIONS,
    tools=[file_note],
    approvals={"file_note": ApprovalPolicy(mode=ApprovalMode.ALWAYS, reason="filing")},
)
NOTE_RULES = [
    {
        "name": "file a note",
        "when": {"last_role": "user", "last_user": "^file note: (?P<text>.+)$"},
        "reply": {
            "tool_calls": [
                {"name": "file_note", "arguments": {"text": "{text}", "label": ARGUMENT_WORD}}
            ]
        },
    },
    {
        "name": "shred a note",
        "when": {"last_role": "user", "last_user": "^shred note: (?P<text>.+)$"},
        "reply": {
            "tool_calls": [{"name": "shred_note", "arguments": {"text": "{text}", "label": "x"}}]
        },
    },
    {
        "name": "filed",
        "when": {
            "last_role": "tool",
            "last_tool_name": "file_note",
            "last_tool_result": '"ref": "(?P<ref>[^"]+)"',
        },
        "reply": {"content": f"Filed under {{ref}}; {ANSWER_WORD}."},
    },
]


@pytest.fixture
def notes_model(model: ScriptedModelServer) -> ScriptedModelServer:
    model.set_rules(
        RuleSet.from_dict(
            {"rules": NOTE_RULES + TEST_RULES["rules"], "default": TEST_RULES["default"]}
        )
    )
    return model


async def with_settings(h: Harness, **changes: object) -> Harness:
    """The harness with a client (and so workers) built from settings with these changes."""
    h.settings = replace(h.settings, **changes)  # type: ignore[arg-type]
    h.client = await Client.connect(
        h.env.client.service_client.config.target_host,
        data_converter=h.settings.data_converter(),
    )
    h.agents = AgentClient(h.client, h.settings)
    return h


async def temporal_show(h: Harness, run: str, *codec: str) -> str:
    """`temporal workflow show --output json`, the real CLI, as an operator runs it."""
    proc = await asyncio.create_subprocess_exec(
        TEMPORAL,
        "workflow",
        "show",
        "--workflow-id",
        run,
        "--output",
        "json",
        "--address",
        h.env.client.service_client.config.target_host,
        *codec,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def readable(shown: str) -> str:
    """Everything a reader of the CLI's JSON sees, with each base64 string decoded (the CLI
    prints payload data as base64: plain text is one `base64 -d` away)."""
    seen: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            seen.append(value)
            try:
                seen.append(base64.b64decode(value, validate=True).decode(errors="replace"))
            except ValueError:
                pass

    walk(json.loads(shown))
    return "\n".join(seen)


async def raw_history(h: Harness, run: str) -> bytes:
    """Every byte of the run's history as the server keeps it (no decoding)."""
    history = await h.env.client.get_workflow_handle(run).fetch_history()
    return b"".join(e.SerializeToString() for e in history.events)


async def notes_run(h: Harness) -> str:
    async with h.running([NOTES]):
        run = await h.start("notes", PROMPT)
        result = await h.agents.result(run, timeout=60)
        state = await h.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    assert result.final_answer == f"Filed under {RESULT_WORD}; {ANSWER_WORD}."
    call = next(m for m in state.transcript if m.tool_calls).tool_calls[0]
    assert json.loads(call.arguments) == {"text": PROMPT_WORD, "label": ARGUMENT_WORD}
    return run


def http(
    url: str, body: bytes | None = None, method: str = "POST", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def payloads_json(*payloads: Payload) -> bytes:
    from google.protobuf import json_format

    return json.dumps({"payloads": [json_format.MessageToDict(p) for p in payloads]}).encode()


@pytest.fixture
def codec_server() -> Iterator[CodecServer]:
    keys = KeyRing.parse(f"{KEY_B},{KEY_A}")
    with CodecServer(EncryptionCodec(keys), TOKEN, port=0) as server:
        yield server


# ---- the history holds ciphertext only; clients and the codec server decode it


async def test_history_holds_no_plain_text_and_clients_decode_it(
    env: WorkflowEnvironment,
    notes_model: ScriptedModelServer,
    ledger: Ledger,
    codec_server: CodecServer,
) -> None:
    plain = Harness(env, notes_model, ledger)
    plain_run = await notes_run(plain)
    encrypted = await with_settings(Harness(env, notes_model, ledger), encryption_keys=KEY_A)
    run = await notes_run(encrypted)  # the client reads the answer and the state decoded

    # the control: without encryption every secret is there, as JSON and as bytes
    shown = readable(await temporal_show(plain, plain_run))
    raw = await raw_history(plain, plain_run)
    for word in SECRETS:
        assert word in shown and word.encode() in raw, word

    shown = await temporal_show(encrypted, run)
    raw = await raw_history(encrypted, run)
    for word in SECRETS:
        assert word not in readable(shown) and word.encode() not in raw, word
    events = json.loads(shown)["events"]
    assert events[-1]["eventType"] == "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED"
    # what stays readable: the run's shape, activity types, search attributes (the agent's
    # and the user's names); summaries are encrypted with the rest (docs/security.md)
    visible = readable(shown)
    assert "keel.run_tool" in visible and '"notes"' in visible and '"tester"' in visible
    assert "tool file_note" not in visible and "notes for tester" not in visible

    # through the codec server, the CLI shows the run decoded
    decoded = await temporal_show(
        encrypted,
        run,
        "--codec-endpoint",
        codec_server.url,
        "--codec-auth",
        f"Bearer {TOKEN}",
    )
    for word in (*SECRETS, "tool file_note", "notes for tester"):
        assert word in readable(decoded), word


async def test_failure_messages_are_encrypted_too(
    env: WorkflowEnvironment, notes_model: ScriptedModelServer, ledger: Ledger
) -> None:
    """A failure's message can quote arguments: it moves into the encrypted attributes."""
    h = await with_settings(Harness(env, notes_model, ledger), encryption_keys=KEY_A)
    async with h.running([NOTES]):
        run = await h.start("notes", f"shred note: {PROMPT_WORD}")
        result = await h.agents.result(run, timeout=60)
    assert result.final_answer is not None
    assert f"RuntimeError: cannot shred {PROMPT_WORD}" in result.final_answer  # read decoded
    history = await env.client.get_workflow_handle(run).fetch_history()
    (failed,) = [
        e.activity_task_failed_event_attributes.failure
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED
    ]
    assert failed.message == "Encoded failure" and failed.encoded_attributes.metadata[KEY_ID]
    assert PROMPT_WORD.encode() not in await raw_history(h, run)


async def test_payload_storage_keeps_ciphertext_only(
    env: WorkflowEnvironment, notes_model: ScriptedModelServer, ledger: Ledger, tmp_path: Path
) -> None:
    """Temporal encodes before it stores: the blobs in KEEL_PAYLOAD_DIR are encrypted."""
    stored: dict[str, list[bytes]] = {}
    for name, keys in (("plain", None), ("encrypted", KEY_A)):
        h = await with_settings(
            Harness(env, notes_model, ledger),
            payload_dir=str(tmp_path / name),
            payload_threshold=256,
            encryption_keys=keys,
        )
        run = await notes_run(h)
        raw = await raw_history(h, run)
        stored[name] = [p.read_bytes() for p in (tmp_path / name).rglob("*") if p.is_file()]
        assert stored[name], "nothing was stored: the threshold did not take"
        if keys:
            assert not any(word.encode() in raw for word in SECRETS)
    assert any(PROMPT_WORD.encode() in blob for blob in stored["plain"])  # the control
    for blob in stored["encrypted"]:
        payload = Payload.FromString(blob)
        assert payload.metadata["encoding"] == ENCODING
        assert payload.metadata[KEY_ID] == b"key-a"
        assert not any(word.encode() in blob for word in SECRETS)


# ---- keys rotate without losing runs


async def test_rotation_keeps_old_runs_readable_and_encrypts_with_the_new_key(
    env: WorkflowEnvironment, notes_model: ScriptedModelServer, ledger: Ledger
) -> None:
    old = await with_settings(Harness(env, notes_model, ledger), encryption_keys=KEY_A)
    async with old.running([NOTES_APPROVED]):
        run = await old.start("notes-approved", PROMPT)
        state = await wait_for(lambda: _pending(old, run))
        call_id = state.pending_approvals[0].call_id
    # the worker under key A is gone; the run waits for a person, written under key A

    new = await with_settings(
        Harness(env, notes_model, ledger),
        task_queue=old.settings.task_queue,
        encryption_keys=f"{KEY_B},{KEY_A}",
    )
    async with new.running([NOTES_APPROVED]):
        receipt = await new.agents.approve(run, call_id, "alice")
        assert receipt.accepted
        result = await new.agents.result(run, timeout=60)
    assert result.final_answer == f"Filed under {RESULT_WORD}; {ANSWER_WORD}."

    history = await env.client.get_workflow_handle(run).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes.input.payloads[0]
    completed = history.events[-1].workflow_execution_completed_event_attributes.result.payloads[0]
    assert started.metadata[KEY_ID] == b"key-a" and completed.metadata[KEY_ID] == b"key-b"
    # a process that dropped key A too early is told which key it misses
    with pytest.raises(UnknownKeyError, match="'key-a'") as e:
        await EncryptionCodec(KeyRing.parse(KEY_B)).decode([started])
    assert e.value.key_id == "key-a" and "KEEL_ENCRYPTION_KEYS" in str(e.value)


async def _pending(h: Harness, run: str) -> RunState | None:
    state = await h.agents.get_state(run)
    return state if state.pending_approvals else None


# ---- misconfigurations fail clearly and garble nothing


async def test_a_worker_without_the_key_holds_the_run_until_one_has_it(
    env: WorkflowEnvironment, notes_model: ScriptedModelServer, ledger: Ledger
) -> None:
    starter = await with_settings(Harness(env, notes_model, ledger), encryption_keys=KEY_A)
    keyless = await with_settings(
        Harness(env, notes_model, ledger), task_queue=starter.settings.task_queue
    )
    run = await starter.start("notes", PROMPT)
    async with keyless.running([NOTES]):
        failure = await wait_for(lambda: _task_failure(starter, run))
    assert "'key-a'" in failure and "KEEL_ENCRYPTION_KEYS" in failure
    # nothing was decided on ciphertext: a worker with the key finishes the run
    async with starter.running([NOTES]):
        result = await starter.agents.result(run, timeout=60)
    assert result.final_answer == f"Filed under {RESULT_WORD}; {ANSWER_WORD}."
    # a client without the key cannot read it, and says why
    with pytest.raises(UnknownKeyError, match="'key-a'.*KEEL_ENCRYPTION_KEYS"):
        await keyless.agents.result(run, timeout=10)


async def _task_failure(h: Harness, run: str) -> str | None:
    history = await h.env.client.get_workflow_handle(run).fetch_history()
    for e in history.events:
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
            return e.workflow_task_failed_event_attributes.failure.message
    return None


async def test_a_worker_refuses_a_client_that_does_not_encrypt(harness: Harness) -> None:
    harness.settings = replace(harness.settings, encryption_keys=KEY_A)
    with pytest.raises(ValueError, match=r"encrypt with keys \['key-a'\].*does not encrypt"):
        harness.worker()
    other = await Client.connect(
        harness.env.client.service_client.config.target_host,
        data_converter=replace(harness.settings, encryption_keys=KEY_B).data_converter(),
    )
    with pytest.raises(ValueError, match=r"encrypts with keys \['key-b'\]"):
        build_worker(other, settings=harness.settings, agents=[NOTES])


# ---- the codec itself


async def test_codec_encrypts_each_payload_and_authenticates_it() -> None:
    codec = EncryptionCodec(KeyRing.parse(f"{KEY_A},{KEY_B}"))
    plain = Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(PROMPT).encode())
    one, two = await codec.encode([plain, plain])
    assert one.metadata["encoding"] == ENCODING and one.metadata[KEY_ID] == b"key-a"
    assert one.data[:12] != two.data[:12] and one.data != two.data  # a nonce per payload
    assert PROMPT_WORD.encode() not in one.data and b"json/plain" not in one.data
    assert await codec.decode([one, two]) == [plain, plain]
    # unencrypted payloads (older runs, hand-typed signals) pass through
    assert await codec.decode([plain]) == [plain]

    tampered = Payload()
    tampered.CopyFrom(one)
    tampered.data = one.data[:-1] + bytes([one.data[-1] ^ 1])
    with pytest.raises(PayloadDecryptError, match="fails authentication"):
        await codec.decode([tampered])
    # the key id is authenticated: relabelling a payload with another known key fails
    relabelled = Payload()
    relabelled.CopyFrom(one)
    relabelled.metadata[KEY_ID] = b"key-b"
    with pytest.raises(PayloadDecryptError, match="fails authentication"):
        await codec.decode([relabelled])
    with pytest.raises(UnknownKeyError, match="'key-c'"):
        relabelled.metadata[KEY_ID] = b"key-c"
        await codec.decode([relabelled])


def test_keys_come_from_the_environment_or_a_file(tmp_path: Path) -> None:
    s = Settings.from_env({"KEEL_ENCRYPTION_KEYS": f"{KEY_B}, {KEY_A}"})
    assert s.encrypts and s.key_ring().ids == ["key-b", "key-a"]  # type: ignore[union-attr]
    assert KEY_A.split(":")[1] not in repr(s)
    keys = tmp_path / "keys"
    keys.write_text(f"# newest first\n{KEY_B}\n{KEY_A}  # retire after May\n")
    s = Settings.from_env({"KEEL_ENCRYPTION_KEYS_FILE": str(keys)})
    assert s.key_ring().ids == ["key-b", "key-a"]  # type: ignore[union-attr]
    secret = KEY_A.split(":")[1]
    for spec, message in [
        ("key-a:" + base64.b64encode(b"k" * 24).decode(), "is 24 bytes; AES-256 needs 32"),
        ("key-a:not*base64", "not valid base64"),
        (secret, "not `id:base64key`"),
        (f"{KEY_A},{KEY_A}", "given twice"),
        (f"bad id:{secret}", "key id 'bad id'"),
        (" , ", "names no encryption key"),
    ]:
        with pytest.raises(SettingsError, match=message) as e:
            Settings.from_env({"KEEL_ENCRYPTION_KEYS": spec})
        assert secret[:20] not in str(e.value)
    with pytest.raises(SettingsError, match="both set"):
        Settings.from_env({"KEEL_ENCRYPTION_KEYS": KEY_A, "KEEL_ENCRYPTION_KEYS_FILE": str(keys)})
    with pytest.raises(SettingsError, match="KEEL_ENCRYPTION_KEYS_FILE"):
        Settings.from_env({"KEEL_ENCRYPTION_KEYS_FILE": str(tmp_path / "missing")})


async def test_keygen_and_codec_server_commands() -> None:
    code, out, _ = await keel_cli(None, "keygen", "--id", "prod-1")
    assert code == 0 and KeyRing.parse(out.strip()).ids == ["prod-1"]
    code, out, _ = await keel_cli(None, "keygen", "--token")
    assert code == 0 and len(out.strip()) >= 32
    code, _, err = await keel_cli(
        None, "codec-server", env={"KEEL_ENCRYPTION_KEYS": KEY_A, "KEEL_CODEC_AUTH_TOKEN": ""}
    )
    assert code == 1 and "KEEL_CODEC_AUTH_TOKEN" in err and "Traceback" not in err


# ---- the codec server


def test_codec_server_needs_the_token_and_answers_the_web_ui(codec_server: CodecServer) -> None:
    codec = EncryptionCodec(KeyRing.parse(KEY_A))
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'"hello"')
    (sealed,) = codec.encrypt([plain])
    body = payloads_json(sealed)
    url = codec_server.url
    ui = "http://localhost:8233"

    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": TOKEN},
    ):
        status, _, _ = http(
            f"{url}/decode", body, **{"Content-Type": "application/json", **headers}
        )
        assert status == 401, headers

    status, _, out = http(
        f"{url}/decode?preserveStorageRefs=true",
        body,
        **{"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 200
    (decoded,) = json.loads(out)["payloads"]
    assert base64.b64decode(decoded["data"]) == b'"hello"'
    assert base64.b64decode(decoded["metadata"]["encoding"]) == b"json/plain"

    status, _, out = http(
        f"{url}/prefix/encode",
        payloads_json(plain),
        **{"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    (encoded,) = json.loads(out)["payloads"]
    assert status == 200 and base64.b64decode(encoded["metadata"][KEY_ID]) == b"key-b"

    # the Web UI's preflight, and its origin only
    status, headers, _ = http(
        f"{url}/decode",
        method="OPTIONS",
        Origin=ui,
        **{"Access-Control-Request-Method": "POST"},
        **{"Access-Control-Request-Headers": "content-type,x-namespace"},
    )
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ui
    assert "x-namespace" in headers["Access-Control-Allow-Headers"].lower()
    assert headers["Access-Control-Allow-Credentials"] == "true"
    status, headers, _ = http(f"{url}/decode", method="OPTIONS", Origin="https://evil.example")
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    status, _, _ = http(
        f"{url}/decode",
        body,
        Origin="https://evil.example",
        **{"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 403

    # a browser signs in once; the Web UI's requests then carry the session cookie
    status, _, _ = http(
        f"{url}/login", b"token=wrong", **{"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 401
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(
        f"{url}/login",
        data=f"token={TOKEN}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    try:
        opener.open(request, timeout=10)
        raise AssertionError("the sign-in must redirect")
    except urllib.error.HTTPError as e:
        assert e.code == 303
        cookie = e.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    session = cookie.split(";", 1)[0]
    assert session.startswith(SESSION_COOKIE + "=")
    status, headers, out = http(
        f"{url}/decode", body, Origin=ui, Cookie=session, **{"Content-Type": "application/json"}
    )
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ui
    status, _, _ = http(
        f"{url}/decode",
        body,
        Origin=ui,
        Cookie=f"{SESSION_COOKIE}=forged",
        **{"Content-Type": "application/json"},
    )
    assert status == 401

    # a payload under a key the server does not have: a clear refusal, not ciphertext
    (unknown,) = EncryptionCodec(KeyRing.parse(new_key("key-z"))).encrypt([plain])
    status, _, out = http(
        f"{url}/decode",
        payloads_json(unknown),
        **{"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 422 and "'key-z'" in json.loads(out)["error"]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        return None
