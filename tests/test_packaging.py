"""Project conventions a packager or a new user relies on."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import reliable

ROOT = Path(__file__).resolve().parent.parent


def test_license_file_matches_the_metadata() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert project["authors"]


def test_changelog_names_the_current_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in changelog and f"## {reliable.__version__}" in changelog


def test_sdist_ships_the_docs_the_readme_links_to() -> None:
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "recursive-include docs *.md *.png *.json" in manifest and "LICENSE" in manifest


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_completion_as_the_readme_says(shell: str) -> None:
    rmsg = Path(sys.executable).parent / "rmsg"
    if not rmsg.exists():
        pytest.skip("the rmsg script is not installed beside this interpreter")
    assert f"_RMSG_COMPLETE={shell}_source rmsg" in (ROOT / "README.md").read_text()
    done = subprocess.run(
        [str(rmsg)],
        env={**os.environ, "_RMSG_COMPLETE": f"{shell}_source"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and "_RMSG_COMPLETE" in done.stdout
