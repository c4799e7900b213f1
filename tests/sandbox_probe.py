"""A workflow that imports Keel inside Temporal's sandbox and says which I/O libraries the
sandbox then holds (tests/test_package.py): a module of its own, since the sandbox imports a
workflow's module afresh, and this one imports nothing else."""

import sys

from temporalio import workflow

IO_LIBRARIES = ("openai", "httpx", "httpx2", "aiohttp", "sqlite3", "_sqlite3")


@workflow.defn(name="test.SandboxImports")
class SandboxImports:
    @workflow.run
    async def run(self) -> list[str]:
        """The I/O modules in the sandbox's own sys.modules after importing Keel's workflow
        code and the public API, as a user's workflow module does."""
        try:
            import keel.workflows.agent  # noqa: F401
            from keel import KeelWorkflow  # noqa: F401
        except Exception as e:  # the sandbox refused what Keel imports
            return [f"import failed: {type(e).__name__}: {e}"]
        return sorted(m for m in sys.modules if m.split(".")[0] in IO_LIBRARIES)
