"""setuptools entry point: metadata lives in pyproject.toml; this adds the optional compiled core.

See tools/rmsg_build.py (the build backend) and docs/performance.md.
"""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
from rmsg_build import setup_arguments

setup(**setup_arguments())
