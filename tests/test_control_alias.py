"""``reliable.control``, the old name of :mod:`reliable.node_messages` (issue 18), still
imports, with a DeprecationWarning, under the old names. (tools/rename_control.py
leaves this file alone.)"""

from __future__ import annotations

import warnings

import pytest


def test_the_old_control_module_still_answers_with_a_warning() -> None:
    import importlib
    import sys

    sys.modules.pop("reliable.control", None)
    with pytest.warns(DeprecationWarning, match="reliable.node_messages"):
        old = importlib.import_module("reliable.control")
    from reliable import node_messages

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert old.ControlMessage is node_messages.NodeMessage
        assert old.decode_control is node_messages.decode_node_message
        assert old.encode_control(node_messages.Cancel(3)) == node_messages.encode_node_message(
            node_messages.Cancel(3)
        )
