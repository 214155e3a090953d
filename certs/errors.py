"""The two ways the PKI says no."""

from __future__ import annotations

from fleet.protocol.errors import FleetError


class PkiError(FleetError):
    """A PKI file is missing, unreadable or inconsistent, or a request on it is refused.

    The message names the file or the identity, so the CLI can print it as the one-line error.
    """


class CertificateRejected(FleetError):
    """A (peer) certificate carries no usable fleet identity; the message says why."""
