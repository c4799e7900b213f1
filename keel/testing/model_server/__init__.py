"""A scripted model server speaking the OpenAI Chat Completions API over HTTP.

It is Keel's offline default model and the model used in tests. Replies come from a rules
file: each rule has conditions on the conversation in the request (stateless, so many concurrent
runs can share one server) and a reply (text, tool calls, an error, optionally delayed or held
at a named gate until a test releases it). A request with ``"stream": true`` gets the reply as
``chat.completion.chunk`` Server-Sent Events, paced, held half-written or broken as the reply
says. Faults (429/500/503/400/401, slow replies, malformed bodies or chunks, dropped
connections) can be injected by count or by a seeded rate, from the rules file, over HTTP
(``POST /admin/faults``) or from Python (``set_faults``).

Run it in the foreground with ``python -m keel.testing.model_server --rules FILE --port 8765``.

Modules: ``rules`` (the rules file schema and ``RuleSet``), ``matching`` (conditions against a
conversation, placeholder substitution), ``completions`` (response and error bodies),
``chunks`` (a completion as the chunks of a stream),
``script`` (``ScriptedModel``: rules, faults, gates, request log; no HTTP), ``app`` (the
Starlette app), ``server`` (``ScriptedModelServer``: uvicorn on a thread), ``cli`` (``main``).
"""

from .cli import main
from .completions import MODEL_ID
from .completions import build_completion as build_completion
from .completions import error_body as error_body
from .rules import (
    SUPPORT_RULES,
    BreakAfter,
    Conditions,
    ErrorSpec,
    FaultSpec,
    HoldAfter,
    Reply,
    Rule,
    RulesError,
    RuleSet,
    ToolCallSpec,
)
from .rules import FaultKind as FaultKind
from .rules import Role as Role
from .rules import parse_faults as parse_faults
from .script import ScriptedModel
from .server import PortInUseError, ScriptedModelServer, ServerBindError

__all__ = [
    "SUPPORT_RULES",
    "MODEL_ID",
    "BreakAfter",
    "Conditions",
    "ErrorSpec",
    "FaultSpec",
    "HoldAfter",
    "PortInUseError",
    "Reply",
    "Rule",
    "RuleSet",
    "RulesError",
    "ScriptedModel",
    "ScriptedModelServer",
    "ServerBindError",
    "ToolCallSpec",
    "main",
]
