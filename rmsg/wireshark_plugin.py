"""The Wireshark dissector shipped with rmsg, and where to install it.

``rmsg/wireshark/rmsg.lua`` is a Lua dissector for the whole wire format
(docs/protocol.md); Wireshark and tshark load Lua files found in the user's
*personal Lua plugins* folder at start-up. This module finds that folder —
by asking ``tshark -G folders`` when tshark is installed, else by
Wireshark's documented default for the platform — and copies the file there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

__all__ = ["SCRIPT_NAME", "install", "lua_source", "personal_plugin_dir"]

SCRIPT_NAME = "rmsg.lua"


def lua_source() -> str:
    """The dissector's Lua source, as shipped in the package."""
    return resources.files("rmsg").joinpath("wireshark", SCRIPT_NAME).read_text("utf-8")


def personal_plugin_dir() -> Path:
    """The folder Wireshark reads the current user's Lua plugins from.

    tshark's own answer when it is installed (it knows its version's layout
    and honours ``$WIRESHARK_CONFIG_DIR``-style overrides); otherwise the
    default: ``%APPDATA%\\Wireshark\\plugins`` on Windows,
    ``~/.local/lib/wireshark/plugins`` elsewhere.
    """
    tshark = shutil.which("tshark")
    if tshark is not None:
        try:
            out = subprocess.run(
                [tshark, "-G", "folders"], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        for line in out.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "Personal Lua Plugins" and value.strip():
                return Path(value.strip())
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home())) / "Wireshark" / "plugins"
    return Path.home() / ".local" / "lib" / "wireshark" / "plugins"


def install(folder: Path | None = None) -> Path:
    """Copy the dissector into ``folder`` (default: :func:`personal_plugin_dir`),
    creating it if needed; returns the file written. Raises ``OSError``."""
    target_dir = personal_plugin_dir() if folder is None else folder
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / SCRIPT_NAME
    target.write_text(lua_source(), encoding="utf-8")
    return target
