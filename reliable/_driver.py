"""Kept so code written before the rename still imports: use :mod:`reliable.driver`."""

from .driver import *  # noqa: F403
from .driver import __all__ as __all__
