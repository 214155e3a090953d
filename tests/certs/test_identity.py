from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import certs
from certs import CertificateRejected, Identity, PkiPaths, Role, identity_from_der
from fleet.protocol.errors import FleetError
from tests.certs import CN, OU, O, der_of, load_cert, self_signed_der


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    pki = certs.init_pki(tmp_path_factory.mktemp("pki"))
    certs.issue_device(pki, "gw-0001")
    certs.issue_operator(pki, "alice")
    certs.issue_controller(pki, "ctl-2")
    return pki


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("devices/gw-0001/cert.pem", ("gw-0001", Role.DEVICE)),
        ("operators/alice/cert.pem", ("alice", Role.OPERATOR)),
        ("controllers/ctl-2/cert.pem", ("ctl-2", Role.CONTROLLER)),
        ("controller.pem", ("fleet-controller", Role.CONTROLLER)),
        ("operator.pem", ("operator", Role.OPERATOR)),
        ("server.pem", ("fleet-server", Role.SERVER)),
    ],
)
def test_identity_from_der_for_each_role(pki: PkiPaths, path: str, expected: tuple[str, Role]) -> None:
    cert_path = pki.root / path
    name, role = expected
    identity = certs.identity_from_der(der_of(cert_path))
    assert identity == Identity(name=name, role=role, serial=load_cert(cert_path).serial_number)
    assert identity.role == role.value  # a StrEnum compares with the plain OU string


def test_unknown_role_is_rejected() -> None:
    der = self_signed_der([(CN, "gw-0001"), (OU, "admin"), (O, "fleet")])
    with pytest.raises(CertificateRejected, match=r"unknown role OU='admin'"):
        certs.identity_from_der(der)


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ([(OU, "device"), (O, "fleet")], "subject has no CN"),
        ([(CN, "gw-0001"), (O, "fleet")], "subject has no OU"),
        ([(CN, "gw 1"), (OU, "device")], r"CN 'gw 1' is not a valid node id"),
        ([(CN, "fleet/v1/#"), (OU, "operator")], r"CN 'fleet/v1/#' is not a valid node id"),
        ([(CN, "a"), (CN, "b"), (OU, "device")], "2 CN attributes"),
    ],
)
def test_subjects_without_a_clear_identity_are_rejected(
    attributes: list[tuple[x509.ObjectIdentifier, str]], reason: str
) -> None:
    with pytest.raises(CertificateRejected, match=reason):
        certs.identity_from_der(self_signed_der(attributes))


def test_the_ca_certificate_is_no_identity(pki: PkiPaths) -> None:
    with pytest.raises(CertificateRejected, match="no OU"):
        certs.identity_from_der(der_of(pki.ca_cert))


def test_garbage_is_rejected_not_crashing() -> None:
    with pytest.raises(CertificateRejected, match=r"not a DER X\.509 certificate"):
        certs.identity_from_der(b"\x30\x03garbage")


def test_rejection_is_a_fleet_error() -> None:
    assert issubclass(CertificateRejected, FleetError)
    assert issubclass(certs.PkiError, FleetError)


def test_issuing_ca_certificates_may_only_be_devices(tmp_path: Path) -> None:
    # What a stolen issuing key could mint: a controller. The embedded broker must not take it.
    pki = certs.init_pki(tmp_path / "pki")
    issuing_key = serialization.load_pem_private_key(pki.issuing_key.read_bytes(), password=None)
    assert isinstance(issuing_key, ec.EllipticCurvePrivateKey)
    issuing = load_cert(pki.issuing_cert)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [x509.NameAttribute(CN, "ctl-9"), x509.NameAttribute(OU, "controller"), x509.NameAttribute(O, "fleet")]
            )
        )
        .issuer_name(issuing.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(issuing_key, hashes.SHA256())
    )
    with pytest.raises(
        CertificateRejected, match="controller 'ctl-9' issued by the device-issuing CA, which issues devices only"
    ):
        identity_from_der(forged.public_bytes(serialization.Encoding.DER))
    device = load_cert(certs.issue_device(pki, "gw-1").cert)
    assert identity_from_der(device.public_bytes(serialization.Encoding.DER)).role is Role.DEVICE
