"""netem: seeded fault injection for UDP — pure models, a socket wrapper, a simulated network.

The models (:mod:`netem.models`) decide; the carriers apply: :mod:`netem.socket`
wraps a real UDP socket in-process, :mod:`netem.sim` runs sans-I/O hosts on a
virtual clock. Same seed, same inputs, same decisions.
"""

from __future__ import annotations

from .models import FaultCounters, FaultModel, Impairment
from .sim import SansIOHost, SimNetwork

__all__ = ["FaultCounters", "FaultModel", "Impairment", "SansIOHost", "SimNetwork"]
