"""tools/soak.py, briefly: it runs, it is deterministic, and it catches a broken property."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rmsg_soak_tool", ROOT / "tools" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_few_scenarios_hold(capsys: pytest.CaptureFixture[str]) -> None:
    soak = _soak()
    # seed 2: a black hole after PMTUD grew the datagrams (the stall this tool found)
    assert soak.main(["--first", "1", "--runs", "3", "--seconds", "120"]) == 0
    out = capsys.readouterr().out
    assert "3 scenarios, 0 failed" in out


def test_a_seed_draws_the_same_scenario_every_time() -> None:
    soak = _soak()
    assert soak.draw(7).describe() == soak.draw(7).describe()
    assert soak.draw(7).describe() != soak.draw(8).describe()


def test_a_damaged_delivery_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks can fail: flip a byte of every arrival and the soak must say so."""
    soak = _soak()
    real = soak._collect

    def damaging(ep, mine, theirs, now):  # type: ignore[no-untyped-def]
        before = len(theirs.arrived)
        real(ep, mine, theirs, now)
        for e in theirs.arrived[before:]:
            if len(e.data) > 5:
                e.data = e.data[:5] + bytes([e.data[5] ^ 1]) + e.data[6:]

    monkeypatch.setattr(soak, "_collect", damaging)
    with pytest.raises(soak.SoakFailure, match="damaged"):
        soak.run(soak.draw(1))
