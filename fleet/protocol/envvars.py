"""Settings from environment variables: ``<PREFIX><KEY>__<SUBKEY>=value`` over a settings tree.

Shared by the agent (``FLEET_AGENT_``) and the controller (``FLEET_CONTROLLER_``), which may not
import each other. Pure: the caller passes the environment. Values are read as YAML scalars or flow
collections, so ``true``, ``30s`` and ``{site: plant-3}`` mean what they do in a settings file.

Hand-rolled instead of pydantic-settings: that package alone adds 2.9 MiB to the agent's RSS.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml


def env_items(environ: Mapping[str, str], prefix: str) -> list[tuple[str, tuple[str, ...], Any]]:
    """``(variable, path, value)`` for every variable named ``<prefix><KEY>[__<SUBKEY>...]``:
    ``FLEET_AGENT_TLS__CA=/x`` -> ``("FLEET_AGENT_TLS__CA", ("tls", "ca"), "/x")``."""
    items: list[tuple[str, tuple[str, ...], Any]] = []
    for name, value in environ.items():
        if not name.upper().startswith(prefix) or len(name) == len(prefix):
            continue
        path = tuple(name[len(prefix) :].lower().split("__"))
        try:
            parsed: Any = yaml.safe_load(value) if value else value
        except yaml.YAMLError:
            parsed = value
        items.append((name, path, parsed))
    return items


def env_overrides(environ: Mapping[str, str], prefix: str) -> dict[str, Any]:
    """The variables of ``prefix`` as one nested mapping: ``FLEET_AGENT_TLS__CA=/x`` -> ``{"tls": {"ca": "/x"}}``."""
    overrides: dict[str, Any] = {}
    for _name, path, value in env_items(environ, prefix):
        node = overrides
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return overrides


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` over ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
