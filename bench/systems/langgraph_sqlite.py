"""LangGraph with its SQLite checkpointer: a model node and a tool node in a `StateGraph`.

The nodes make the same calls as the plain loop (`AsyncOpenAI(max_retries=0)` to the fake
endpoint, the tool function called directly); LangGraph checkpoints the state after every
super-step into an `AsyncSqliteSaver` file (WAL, as the saver sets it up, with
`synchronous=NORMAL`: like Keel's embedded dev server, a crash of the process loses
nothing). A run whose process died is resumed from its thread's last checkpoint with
`ainvoke(None, config)`: LangGraph does not find unfinished threads itself, so whoever
restarts the process must say which threads to resume.

LangGraph's default durability is "async": a step's checkpoint is written while the next
step already runs, so a crash can lose the last step (it is done again). "sync" writes it
before the next step starts, as Temporal records each step before the next one.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Durability
from openai import AsyncOpenAI

from bench.conversation import INSTRUCTIONS, MAX_STEPS
from bench.systems.plain_loop import model_turn, run_tools

RECURSION_LIMIT = 2 * MAX_STEPS + 10  # two super-steps per model step


class State(TypedDict):
    messages: Annotated[list[dict[str, Any]], operator.add]


def build(client: AsyncOpenAI, saver: AsyncSqliteSaver) -> Any:
    """The compiled graph: model → tools → model ... → END, checkpointed by `saver`."""

    async def model(state: State) -> dict[str, Any]:
        return {"messages": [await model_turn(client, state["messages"])]}

    async def tools(state: State) -> dict[str, Any]:
        return {"messages": run_tools(state["messages"][-1])}

    def route(state: State) -> str:
        return "tools" if state["messages"][-1].get("tool_calls") else END

    graph = StateGraph(State)
    graph.add_node("model", model)
    graph.add_node("tools", tools)
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", route, ["tools", END])
    graph.add_edge("tools", "model")
    return graph.compile(checkpointer=saver)


def config(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}, "recursion_limit": RECURSION_LIMIT}


async def run(graph: Any, prompt: str, thread: str, durability: Durability = "async") -> str:
    start = {
        "messages": [
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": prompt},
        ]
    }
    out = await graph.ainvoke(start, config(thread), durability=durability)
    return str(out["messages"][-1].get("content") or "")


async def resume(graph: Any, thread: str, durability: Durability = "async") -> str:
    """Go on from the thread's last checkpoint (after the process running it died)."""
    out = await graph.ainvoke(None, config(thread), durability=durability)
    return str(out["messages"][-1].get("content") or "")
