"""The edge agent (``fleet-agent``): one per gateway. It imports ``fleet.protocol`` and nothing else of the fleet."""

__version__ = "0.1.0"
