"""A team's own plain workflow and the activities it calls, served by `keel worker` beside
the agents (`--workflows tests.plain_workflows:Shout --activities
tests.plain_workflows:ACTIVITIES`)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow

CALL_TIMEOUT = timedelta(seconds=30)


@activity.defn(name="tests.shout")
async def shout(text: str) -> str:
    """The text, louder."""
    return text.upper()


@activity.defn(name="tests.count_words")
async def count_words(text: str) -> int:
    """How many words the text has."""
    return len(text.split())


@workflow.defn(name="tests.Shout")
class Shout:
    """Calls one activity by its function and one by its name."""

    @workflow.run
    async def run(self, text: str) -> str:
        loud = await workflow.execute_activity(
            shout, text, start_to_close_timeout=CALL_TIMEOUT, summary="shout"
        )
        words = await workflow.execute_activity(
            "tests.count_words",
            text,
            result_type=int,
            start_to_close_timeout=CALL_TIMEOUT,
            summary="count words",
        )
        return f"{loud} ({words} words)"


ACTIVITIES = [shout, count_words]
