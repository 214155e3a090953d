"""Fleet messaging and update system: controller, operator CLI and the wire protocol."""

__version__ = "0.1.0"
