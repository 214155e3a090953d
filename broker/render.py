"""Render the fleet access policy (broker/policy.py) as Mosquitto or EMQX configuration.

Mosquitto identifies a client by its certificate CN (``use_identity_as_username``) and makes the
CN the client id too (``use_username_as_clientid``), so the rules the embedded broker evaluates
per identity become ``user`` blocks (controllers, operators: named one by one from the PKI) and
``pattern`` lines with ``%u`` (devices). Mosquitto applies pattern lines to every user; that gives
a controller or operator name write access to a node subtree of its own name, which no device can
have because certs/ keeps one namespace for all identity names.
"""

from __future__ import annotations

import getpass
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from broker.embedded import BrokerSettings, Listener
from broker.policy import OWN_ID, Access, Rule, rules_for
from certs import Role, list_identities
from certs.files import PendingFile, write_files

MOSQUITTO_OWN_ID = "%u"
EMQX_OWN_ID = "${username}"
RENDERED_BY = "Rendered by `fleet broker --render` from the fleet access policy; re-render instead of editing."


@dataclass(frozen=True)
class RenderOptions:
    """Where the broker will see files, which may differ from here (containers, packaged services)."""

    pki_dir: Path  # the certificate directory as the broker process sees it
    data_dir: Path  # persistence directory as the broker sees it
    config_dir: Path  # where acl files live as the broker sees it
    user: str  # Mosquitto drops root privileges to this user before reading certificates


def default_options(settings: BrokerSettings, out_dir: Path, user: str | None = None) -> RenderOptions:
    return RenderOptions(
        pki_dir=settings.pki.root.resolve(),
        data_dir=(out_dir / "data").resolve(),
        config_dir=out_dir.resolve(),
        user=user or getpass.getuser(),
    )


def _named_identities(settings: BrokerSettings, role: Role) -> list[str]:
    names = {info.name for info in list_identities(settings.pki) if info.role == role}
    return sorted(names)


def _grants(rules: list[Rule], own_id: str) -> dict[str, set[Access]]:
    grants: dict[str, set[Access]] = defaultdict(set)
    for rule in rules:
        grants[rule.filter_template.replace(OWN_ID, own_id)].add(rule.access)
    return grants


def _mosquitto_access(accesses: set[Access]) -> str:
    if accesses == {Access.PUBLISH, Access.SUBSCRIBE}:
        return "readwrite"
    return "write" if Access.PUBLISH in accesses else "read"


def mosquitto_acl(settings: BrokerSettings) -> str:
    lines = [f"# {RENDERED_BY}", ""]
    for role in (Role.CONTROLLER, Role.OPERATOR):
        for name in _named_identities(settings, role):
            lines.append(f"# {role}")
            lines.append(f"user {name}")
            for topic_filter, accesses in _grants(rules_for(role), name).items():
                lines.append(f"topic {_mosquitto_access(accesses)} {topic_filter}")
            lines.append("")
    lines.append("# devices: every identity, restricted to its own node subtree")
    for topic_filter, accesses in _grants(rules_for(Role.DEVICE), MOSQUITTO_OWN_ID).items():
        lines.append(f"pattern {_mosquitto_access(accesses)} {topic_filter}")
    return "\n".join(lines) + "\n"


def mosquitto_conf(settings: BrokerSettings, options: RenderOptions) -> str:
    pki = options.pki_dir
    # Mosquitto 2.0 checks a last will against the ACL when it would be sent (context__send_will)
    # and drops a denied one silently; the CONNECT is accepted. per_listener_settings true kept
    # wills from being delivered before 2.0.13 (Mosquitto 7551a299).
    lines = [
        f"# {RENDERED_BY}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"user {options.user}",
        f"acl_file {options.config_dir / 'acl'}",
        "persistence true",
        f"persistence_location {options.data_dir}/",
        "autosave_interval 5",
        # Offline devices queue commands: the default of 1000 dropped 2-10% of a QoS-1 flood here.
        f"max_queued_messages {settings.max_queued_messages}",
        # A byte cap too: a count alone lets one client's queue hold 100,000 x 512 KiB.
        f"max_queued_bytes {settings.max_queued_bytes}",
        f"max_packet_size {settings.max_packet_size}",
        "set_tcp_nodelay true",
        "connection_messages true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "",
    ]
    for listener in settings.listeners:
        lines += [
            f"listener {listener.port} {listener.host}",
            "protocol mqtt",
            f"cafile {pki / 'ca.pem'}",
            f"certfile {pki / 'server.pem'}",
            f"keyfile {pki / 'server.key'}",
            f"crlfile {pki / 'crl.pem'}",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            "tls_version tlsv1.2",
        ]
        if listener.max_connections:
            lines.append(f"max_connections {listener.max_connections}")
        lines.append("")
    return "\n".join(lines)


def emqx_acl(settings: BrokerSettings) -> str:
    lines = [f"%% {RENDERED_BY}"]
    for role in (Role.CONTROLLER, Role.OPERATOR):
        for name in _named_identities(settings, role):
            for topic_filter, accesses in _grants(rules_for(role), name).items():
                lines.append(f'{{allow, {{user, "{name}"}}, {_emqx_action(accesses)}, ["{topic_filter}"]}}.')
    for topic_filter, accesses in _grants(rules_for(Role.DEVICE), EMQX_OWN_ID).items():
        lines.append(f'{{allow, all, {_emqx_action(accesses)}, ["{topic_filter}"]}}.')
    lines.append("{deny, all}.")
    return "\n".join(lines) + "\n"


def _emqx_action(accesses: set[Access]) -> str:
    if accesses == {Access.PUBLISH, Access.SUBSCRIBE}:
        return "all"
    return "publish" if Access.PUBLISH in accesses else "subscribe"


def emqx_conf(settings: BrokerSettings, options: RenderOptions) -> str:
    pki = options.pki_dir
    listeners = []
    for index, listener in enumerate(settings.listeners):
        listeners.append(
            f"""listeners.ssl.fleet{index} {{
  bind = "{listener.label}"
  max_connections = {listener.max_connections or "infinity"}
  ssl_options {{
    cacertfile = "{pki / "ca.pem"}"
    certfile = "{pki / "server.pem"}"
    keyfile = "{pki / "server.key"}"
    verify = verify_peer
    fail_if_no_peer_cert = true
    versions = ["tlsv1.3", "tlsv1.2"]
  }}
}}"""
        )
    return f"""# {RENDERED_BY}
# EMQX checks revocation through the CRL distribution point of a certificate (HTTP), not from a
# file: serve crl.pem over HTTP and set ssl_options.enable_crl_check where revocation matters.
# Last wills go through the authorization below as publishes: EMQX >= 5.0.9 (emqx/emqx#8978)
# checks a will when it would be published and drops a denied one (log:
# last_will_testament_publish_denied); the CONNECT itself is accepted. Older 5.0.x: unchecked.
listeners.tcp.default.enable = false
listeners.ws.default.enable = false
listeners.wss.default.enable = false
listeners.ssl.default.enable = false
{chr(10).join(listeners)}
mqtt {{
  peer_cert_as_username = cn
  peer_cert_as_clientid = cn
  max_mqueue_len = {settings.max_queued_messages}
  max_packet_size = {settings.max_packet_size}
}}
authorization {{
  no_match = deny
  deny_action = ignore
  cache.enable = true
  sources = [{{ type = file, enable = true, path = "{options.config_dir / "acl.conf"}" }}]
}}
"""


def render(kind: str, settings: BrokerSettings, out_dir: Path, options: RenderOptions) -> list[Path]:
    """Write the configuration for ``kind`` ("mosquitto" or "emqx") into out_dir; return the files."""
    if kind == "mosquitto":
        files = {"mosquitto.conf": mosquitto_conf(settings, options), "acl": mosquitto_acl(settings)}
        (out_dir / "data").mkdir(parents=True, exist_ok=True)
    elif kind == "emqx":
        files = {"emqx.conf": emqx_conf(settings, options), "acl.conf": emqx_acl(settings)}
    else:
        raise ValueError(f"unknown broker kind {kind!r}")
    pending = [PendingFile(out_dir / name, text.encode()) for name, text in files.items()]
    write_files(pending)  # all or nothing: a config never references an ACL file from another render
    return [file.path for file in pending]


__all__ = [
    "Listener",
    "RenderOptions",
    "default_options",
    "emqx_acl",
    "emqx_conf",
    "mosquitto_acl",
    "mosquitto_conf",
    "render",
]
