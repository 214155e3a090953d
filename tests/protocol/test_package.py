"""The package surface: lazy re-exports, and importing one module costs only that module."""

from __future__ import annotations

import importlib
import subprocess
import sys

import fleet.protocol


def fresh_modules(code: str) -> set[str]:
    """Top-level module names in sys.modules after running ``code`` in a fresh interpreter (this one
    has already imported everything other tests needed)."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    return set(result.stdout.split())


def test_main_names_are_reexported() -> None:
    for name in fleet.protocol.__all__:
        assert hasattr(fleet.protocol, name), name
    assert fleet.protocol.node_topic("gw1", fleet.protocol.Channel.CMD) == "fleet/v1/nodes/gw1/cmd"


def test_lazy_table_matches_all_and_the_submodules() -> None:
    table = fleet.protocol._SUBMODULE_OF
    assert sorted(table) == sorted(fleet.protocol.__all__)
    for name, module in table.items():
        assert getattr(importlib.import_module(f"fleet.protocol.{module}"), name) is getattr(fleet.protocol, name)


def test_unknown_name_is_an_attribute_error() -> None:
    assert not hasattr(fleet.protocol, "NoSuchThing")


def test_importing_one_submodule_loads_neither_pydantic_nor_msgpack() -> None:
    loaded = fresh_modules("import fleet.protocol.ids, fleet.protocol.errors, fleet.protocol.topics")
    assert "fleet" in loaded
    assert not loaded & {"pydantic", "pydantic_core", "msgpack", "cryptography", "zstandard"}


def test_names_still_import_from_the_package() -> None:
    loaded = fresh_modules(
        "from fleet.protocol import Command, node_topic\n"
        "assert Command.__module__ == 'fleet.protocol.messages'\n"
        "assert node_topic.__module__ == 'fleet.protocol.topics'\n"
        "from fleet.protocol import *"
    )
    assert "pydantic" in loaded


def test_importing_the_protocol_does_not_load_cryptography() -> None:
    assert not any(m == "cryptography" for m in fresh_modules("from fleet.protocol import *"))
