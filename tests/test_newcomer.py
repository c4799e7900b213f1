"""A newcomer's project, made of what the docs show and nothing else: the tools and agents of
the README's "Define a tool and an agent", the rules and the test of docs/testing.md's
complete example. Its test runs against Keel's wheel in a fresh virtual environment, so a
snippet that stops working, or a test kit that needs more than the docs say, fails here."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from tests.wheel import ROOT, Installed

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def section(markdown: Path, heading: str) -> str:
    """The text under `heading` (a `## ` heading), up to the next heading of that level."""
    text = markdown.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of `language` in `text`, in order."""
    return [body for lang, body in FENCE.findall(text) if lang == language]


def test_the_snippets_are_found() -> None:
    agents = blocks(section(ROOT / "README.md", "Define a tool and an agent"), "python")
    assert "@tool" in agents[0] and "TRIAGE = Agent(" in agents[0]
    example = section(ROOT / "docs" / "testing.md", "A complete example")
    assert len(blocks(example, "json")) == 1 and len(blocks(example, "python")) == 1


async def test_a_project_from_the_docs_passes_its_own_test(
    installed_keel: Installed, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    readme = section(ROOT / "README.md", "Define a tool and an agent")
    (project / "agents.py").write_text(blocks(readme, "python")[0])
    example = section(ROOT / "docs" / "testing.md", "A complete example")
    (project / "tests" / "rules.json").write_text(blocks(example, "json")[0])
    (project / "tests" / "test_agents.py").write_text(blocks(example, "python")[0])

    proc = await asyncio.create_subprocess_exec(
        str(installed_keel.python),
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests",
        cwd=project,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    report = out.decode()
    assert proc.returncode == 0, report
    assert re.search(r"\b1 passed\b", report), report
