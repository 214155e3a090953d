#!/bin/sh
# Install the fleet agent from a wheel, after checking the wheel's sha256.
#   install-agent.sh PACKAGE.whl SHA256 [CONFIG.yaml]
# Environment: PREFIX (default /opt/fleet-agent), ETC (default /etc/fleet-agent),
# SYSTEMD_DIR (default /etc/systemd/system; empty to skip the unit), PIP_ARGS (e.g. --no-index
# --find-links ./wheels for an offline gateway).
set -eu

usage() { echo "usage: $0 PACKAGE.whl SHA256 [CONFIG.yaml]" >&2; exit 2; }
[ $# -ge 2 ] || usage
package=$1
expected=$(printf '%s' "$2" | tr 'A-F' 'a-f')
config=${3:-}
PREFIX=${PREFIX:-/opt/fleet-agent}
ETC=${ETC:-/etc/fleet-agent}
SYSTEMD_DIR=${SYSTEMD_DIR-/etc/systemd/system}
here=$(cd "$(dirname "$0")" && pwd)

[ -f "$package" ] || { echo "install-agent: $package: not found" >&2; exit 2; }
case $expected in
  *[!0-9a-f]*|'') echo "install-agent: '$2' is not a sha256 hex digest" >&2; exit 2 ;;
esac
[ ${#expected} -eq 64 ] || { echo "install-agent: '$2' is not a sha256 hex digest" >&2; exit 2; }
actual=$(sha256sum "$package" | cut -d' ' -f1)
if [ "$actual" != "$expected" ]; then
  echo "install-agent: $package: sha256 $actual does not match the expected $expected; nothing installed" >&2
  exit 1
fi

# Each package gets its own virtualenv (named by its digest); the `venv` symlink is switched with
# one rename, so a failed install leaves the running agent untouched and the old one stays for
# rollback.
target="$PREFIX/venvs/${actual%"${actual#????????????}"}"
mkdir -p "$PREFIX/venvs"
rm -rf "$target"
python3 -m venv "$target"
# The wheel without extras: the agent's dependencies only. The controller, broker and `fleet` CLI
# libraries (pyproject's [server] extra: amqtt, fastapi, uvicorn, typer, ...) stay off the gateway.
# shellcheck disable=SC2086 # PIP_ARGS is a list of flags
"$target/bin/pip" install --quiet ${PIP_ARGS:-} "$package"
"$target/bin/fleet-agent" --version >/dev/null
ln -sfn "$target" "$PREFIX/venv.new"
mv -T "$PREFIX/venv.new" "$PREFIX/venv"

mkdir -p "$ETC"
if [ -n "$config" ]; then
  install -m 0640 "$config" "$ETC/config.yaml"
fi
if [ -n "$SYSTEMD_DIR" ]; then
  mkdir -p "$SYSTEMD_DIR"
  install -m 0644 "$here/fleet-agent.service" "$SYSTEMD_DIR/fleet-agent.service"
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now fleet-agent.service
  fi
fi
echo "install-agent: installed $(basename "$package") into $PREFIX/venv"
