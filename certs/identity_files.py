"""Swapping an identity's key and certificate for new ones so that a crash never loses the identity.

A key and its certificate are two files, and no rename replaces two files at once. So
:func:`replace_identity_files` goes through states that are each recoverable:

1. write ``key.pem.new`` then ``cert.pem.new`` (each atomically, fsynced): a crash leaves the old
   pair in place, plus maybe a complete new pair;
2. copy the current pair to ``key.pem.prev`` / ``cert.pem.prev`` (atomically, fsynced);
3. rename ``key.pem.new`` -> ``key.pem``, sync the directory;
4. rename ``cert.pem.new`` -> ``cert.pem``, sync the directory: the new identity is in place;
5. delete the ``.prev`` pair.

Between 3 and 4 ``key.pem`` is new and ``cert.pem`` old: a TLS library refuses that pair. Every file
needed is on disk though: ``cert.pem.new`` matches ``key.pem`` (roll forward) and the ``.prev`` pair
is the complete old identity (roll back). :func:`recover_identity_files` repairs any such state
and is idempotent; run it before loading an identity that may have been mid-renewal (``fleet certs
renew`` does, and so must the agent at start).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from certs.errors import PkiError
from certs.files import PendingFile, sync_directory, write_files
from certs.paths import ClientPaths

NEW_SUFFIX = ".new"
PREV_SUFFIX = ".prev"


def replace_identity_files(paths: ClientPaths, *, cert_pem: bytes, key_pem: bytes) -> None:
    """Make ``cert_pem`` (leaf first, then its chain) and ``key_pem`` the identity at ``paths``.

    Works for a new identity too. ``PkiError`` if the two do not belong together (nothing is written).
    """
    if not _pair_matches(key_pem, cert_pem):
        raise PkiError(f"{paths.cert}: the new certificate does not match the new key")
    key_new, cert_new = _sibling(paths.key, NEW_SUFFIX), _sibling(paths.cert, NEW_SUFFIX)
    write_files([PendingFile(key_new, key_pem, private=True), PendingFile(cert_new, cert_pem)])
    old_key, old_cert = _read_or_none(paths.key), _read_or_none(paths.cert)
    if old_key is not None and old_cert is not None:
        write_files(
            [
                PendingFile(_sibling(paths.key, PREV_SUFFIX), old_key, private=True),
                PendingFile(_sibling(paths.cert, PREV_SUFFIX), old_cert),
            ]
        )
    _rename(key_new, paths.key)
    _rename(cert_new, paths.cert)
    _remove(_sibling(paths.key, PREV_SUFFIX), _sibling(paths.cert, PREV_SUFFIX))


def recover_identity_files(paths: ClientPaths) -> str | None:
    """Repair an identity left half-replaced by a crash; say what was done (``None``: nothing to do).

    Rolls forward to the new pair when it is complete, else back to the previous one; removes
    leftovers once ``key.pem`` and ``cert.pem`` match. ``PkiError`` if no matching pair is left.
    """
    key, cert = paths.key, paths.cert
    key_new, cert_new = _sibling(key, NEW_SUFFIX), _sibling(cert, NEW_SUFFIX)
    key_prev, cert_prev = _sibling(key, PREV_SUFFIX), _sibling(cert, PREV_SUFFIX)
    leftovers = [path for path in (key_new, cert_new, key_prev, cert_prev) if path.exists()]
    if not leftovers:
        return None
    action: str | None = None
    if _files_match(key_new, cert_new):  # crashed before the first rename: finish it
        _rename(key_new, key)
        _rename(cert_new, cert)
        action = f"{cert.parent}: finished an interrupted renewal"
    elif _files_match(key, cert_new):  # crashed between the renames (key first)
        _rename(cert_new, cert)
        action = f"{cert.parent}: finished an interrupted renewal"
    elif _files_match(key_new, cert):  # the same, had the renames reached the disk out of order
        _rename(key_new, key)
        action = f"{cert.parent}: finished an interrupted renewal"
    if not _files_match(key, cert):
        if not _files_match(key_prev, cert_prev):
            raise PkiError(f"{cert.parent}: {key.name} does not match {cert.name}, and no complete pair to recover")
        write_files([PendingFile(key, key_prev.read_bytes(), private=True), PendingFile(cert, cert_prev.read_bytes())])
        action = f"{cert.parent}: restored the previous key and certificate"
    _remove(key_new, cert_new, key_prev, cert_prev)
    return action


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PkiError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _files_match(key: Path, cert: Path) -> bool:
    key_pem, cert_pem = _read_or_none(key), _read_or_none(cert)
    return key_pem is not None and cert_pem is not None and _pair_matches(key_pem, cert_pem)


def _pair_matches(key_pem: bytes, cert_pem: bytes) -> bool:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)  # the first certificate: the leaf
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def _rename(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        raise PkiError(f"{target}: cannot write: {exc.strerror or exc}") from exc
    sync_directory(target.parent)


def _remove(*paths: Path) -> None:
    removed = False
    for path in paths:
        try:
            path.unlink()
            removed = True
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise PkiError(f"{path}: cannot remove: {exc.strerror or exc}") from exc
    if removed:
        sync_directory(paths[0].parent)
