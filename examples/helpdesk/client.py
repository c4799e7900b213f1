"""Ask the helpdesk for help, approve what needs a person, and print what happened.

python client.py "My laptop will not boot and the VPN is down"
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from temporalio.client import Client
from temporalio.envconfig import ClientConfigProfile

from keel import AgentClient, KeelPlugin
from workflows import PlanAndExecute, TicketReport

TASK_QUEUE = "helpdesk"
APPROVER = "lead"


async def main(message: str) -> None:
    connect = ClientConfigProfile.load().to_client_connect_config()
    connect.setdefault("target_host", "localhost:7233")
    client = await Client.connect(**connect, plugins=[KeelPlugin()])
    agents = AgentClient(client, task_queue=TASK_QUEUE)

    run = await agents.start("planner", message, user="sam", loop=PlanAndExecute)
    # The planner hands the urgent ticket to the triage sub-agent, whose run waits for a
    # person: its approval shows up beside every other pending one.
    approved = []
    answer = asyncio.create_task(agents.result(run, timeout=300))
    while not answer.done():
        for p in await agents.pending():
            if p.run_id.startswith(run) and p.call_id not in {a["call"] for a in approved}:
                await agents.approve(p.run_id, p.call_id, APPROVER)
                approved.append(
                    {"run": p.run_id, "call": p.call_id, "tool": p.tool, "arguments": p.arguments}
                )
        await asyncio.wait({answer}, timeout=0.2)
    result = answer.result()
    state = await agents.get_state(run)
    tickets = await client.execute_workflow(
        TicketReport.run, id=f"{run}-report", task_queue=TASK_QUEUE
    )
    print(
        json.dumps(
            {
                "run": run,
                "status": result.status.value,
                "answer": result.final_answer,
                "plan": state.loop_state.get("plan"),
                "approved": approved,
                "tickets": tickets,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main(" ".join(sys.argv[1:]) or "My laptop will not boot and the VPN is down"))
    # The Temporal client's native threads can abort a short-lived process while Python
    # finalizes (temporalio/sdk-python#300): everything is printed, so leave at once.
    sys.stdout.flush()
    os._exit(0)
