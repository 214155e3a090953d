"""The layers contract in pyproject.toml covers every module of the four root packages."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Package markers that hold no code of their own worth layering.
OUTSIDE_LAYERS = {"fleet", "fleet.__main__"}


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return [name.strip() for layer in layers for name in layer.split("|")]


def _modules() -> list[str]:
    found = []
    for package in ("fleet", "agent", "broker", "certs"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def test_every_module_is_in_a_layer() -> None:
    layers = _layers()
    stray = [
        module
        for module in _modules()
        if module not in OUTSIDE_LAYERS
        and not any(module == layer or module.startswith(layer + ".") for layer in layers)
    ]
    assert stray == [], f"modules outside the layers contract: {stray}"


def test_fleet_holds_only_the_layer_packages() -> None:
    loose = sorted(
        p.name for p in (ROOT / "fleet").iterdir() if p.suffix == ".py" and p.stem not in {"__init__", "__main__"}
    )
    assert loose == []
    packages = sorted(p.name for p in (ROOT / "fleet").iterdir() if (p / "__init__.py").is_file())
    assert packages == ["cli", "controller", "protocol", "releases", "tools"]
