"""``fleet-agent --config FILE``: argparse and stdlib logging only, so the agent starts light."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from agent import __version__
from fleet.protocol.errors import ConfigError, FleetError


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fleet-agent", description="Fleet edge agent")
    parser.add_argument("--config", type=Path, required=True, help="YAML settings file")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument("--version", action="version", version=f"fleet-agent {__version__}")
    args = parser.parse_args(argv)
    _configure_logging(args.log_level, args.log_format)

    import asyncio  # not before: `fleet-agent --version` imports no more than it prints

    from agent.config import load_settings
    from agent.daemon import Agent

    try:
        settings = load_settings(args.config)
        agent = Agent(settings, args.config)
    except ConfigError as exc:
        print(f"fleet-agent: error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        asyncio.run(agent.run())
    except FleetError as exc:
        logging.getLogger(__name__).error("%s: stopped: %s", settings.node_id, exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
