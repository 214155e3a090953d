#!/bin/sh
# The system packages the tests use, in one place (.ci/run and `make test` both run this).
# As root: apt-get installs what is missing. Otherwise: one line naming the missing packages and
# the command to install them, and carry on (the tests that need them fail or skip, naming them).
# Either way exit 0: the tests say what they lack more precisely than a failed install would.
set -eu

# One line per dependency: what is checked (a command on PATH, or "py:MODULE", a module python3
# must import), then the Debian package providing it. Add new ones here (postgresql, chromium, ...).
SYSDEPS='
mosquitto       mosquitto
mosquitto_pub   mosquitto-clients
docker-compose  docker-compose
make            make
openssl         openssl
ip              iproute2
nft             nftables
py:ensurepip    python3-venv
faketime        faketime
'
# ip/nft: the fault suite adds packet loss in a network namespace of its own (proxy cuts only without).
# faketime: libfaketime runs an agent with its clock an hour off (tests/agent/test_clock_skew.py).
# python3-venv: `make setup` creates .venv with `python3 -m venv` (Debian ships ensurepip separately).

present() {
  case $1 in
    py:*) python3 -c "import ${1#py:}" >/dev/null 2>&1 ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

missing=$(printf '%s\n' "$SYSDEPS" | while read -r check package; do
  [ -n "$check" ] || continue
  present "$check" || printf '%s ' "$package"
done)
missing=${missing% }

if [ -n "$missing" ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "sysdeps: installing $missing" >&2
    # shellcheck disable=SC2086 # $missing is a list of package names
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null; }; then
      echo "sysdeps: apt-get install $missing failed; the tests that need them will say so" >&2
    fi
  else
    echo "sysdeps: missing $missing; install with: sudo apt-get install -y --no-install-recommends $missing" >&2
  fi
fi

# The Debian package starts a system mosquitto on 1883; the tests start their own on free ports.
if [ "$(id -u)" -eq 0 ] && command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
  systemctl stop mosquitto || true
fi
exit 0
