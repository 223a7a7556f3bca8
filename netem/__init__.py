"""netem: seeded fault injection for UDP — pure models, a socket wrapper, a simulated network.

The models (:mod:`netem.models`) decide, :mod:`netem.spec` reads ``tc netem``
syntax, :mod:`netem.scenario` makes links vary over time; the carriers apply
them: :mod:`netem.socket` wraps a real UDP socket in-process,
:mod:`netem.proxy` relays between real addresses, :mod:`netem.sim` runs
sans-I/O hosts on a virtual clock. Same seed, same inputs, same decisions.

The proxy logs through the ``netem`` logger (``netem.proxy``): start and
stop, clients taken on, refused and expired, and fault changes made while it
runs. Nothing is printed unless the application configures logging.
"""

from __future__ import annotations

import logging

from .models import Decision, FaultCounters, FaultModel, FourState, GilbertElliott, Impairment
from .scenario import Link, Scenario, ScenarioError, Window
from .sim import SansIOHost, SimNetwork
from .spec import SpecError, format_spec, parse_spec

__all__ = [
    "Decision",
    "FaultCounters",
    "FaultModel",
    "FourState",
    "GilbertElliott",
    "Impairment",
    "Link",
    "SansIOHost",
    "Scenario",
    "ScenarioError",
    "SimNetwork",
    "SpecError",
    "Window",
    "format_spec",
    "parse_spec",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
