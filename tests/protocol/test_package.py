"""The package surface: re-exports, and no cryptography on the import path."""

from __future__ import annotations

import subprocess
import sys

import fleet.protocol


def test_main_names_are_reexported() -> None:
    for name in fleet.protocol.__all__:
        assert hasattr(fleet.protocol, name), name
    assert fleet.protocol.node_topic("gw1", fleet.protocol.Channel.CMD) == "fleet/v1/nodes/gw1/cmd"


def test_importing_the_protocol_does_not_load_cryptography() -> None:
    # A fresh interpreter: in this one, other tests have already imported the signing module.
    code = "import sys, fleet.protocol; print(sorted(m for m in sys.modules if m.startswith('cryptography')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
