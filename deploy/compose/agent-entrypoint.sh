#!/bin/sh
# Entry point of the docker-compose `agent` / `agent-emqx` services (`docker-compose up --scale agent=5`).
#
# A replica's hostname is a random container id, so its device certificate cannot be issued for it
# in advance. Instead certificates gw-compose-1..N are issued beforehand into the mounted PKI
#   for i in 1 2 3 4 5; do fleet certs device ./pki gw-compose-$i; done
# and each replica claims the first free one with `mkdir` (atomic) in the shared state volume:
#   $STATE/claims/<node-id>/owner   hostname of the container holding the identity
#   $STATE/nodes/<node-id>/         the agent's state_dir (survives the container)
# A container that finds its own hostname on a claim (restart after a crash or kill -9) takes it
# back. The claim is released when the agent exits (docker-compose stop/down, scale down, crash:
# the restarted container claims again). Only a container removed without running this script to
# the end (docker kill + rm, host crash) leaves a stale claim: clear them with every agent stopped,
#   docker-compose run --rm --no-deps --entrypoint rm agent -rf /var/lib/fleet-agent/claims
#
# Environment (all optional): FLEET_COMPOSE_PKI (/pki), FLEET_COMPOSE_STATE (/var/lib/fleet-agent),
# FLEET_COMPOSE_PREFIX (gw-compose-), FLEET_COMPOSE_CONFIG (/etc/fleet-agent/config.yaml),
# FLEET_COMPOSE_OWNER (the hostname, i.e. the container id: what marks a claim as this container's),
# FLEET_COMPOSE_BROKERS: space-separated HOST:PORT list; replica N uses entry ((N-1) mod count) + 1,
# so agents spread over the nodes of a cluster. Arguments are passed on to fleet-agent.
set -eu

pki=${FLEET_COMPOSE_PKI:-/pki}
state=${FLEET_COMPOSE_STATE:-/var/lib/fleet-agent}
prefix=${FLEET_COMPOSE_PREFIX:-gw-compose-}
config=${FLEET_COMPOSE_CONFIG:-/etc/fleet-agent/config.yaml}
me=${FLEET_COMPOSE_OWNER:-$(uname -n)} # claim owner: the container hostname
claims=$state/claims

say() { echo "agent-entrypoint[$me]: $*" >&2; }

mkdir -p "$claims" "$state/nodes"

node=""
index=0
# A claim this container already holds.
i=1
while [ -d "$pki/devices/$prefix$i" ]; do
  if [ "$(cat "$claims/$prefix$i/owner" 2>/dev/null || true)" = "$me" ]; then
    node=$prefix$i
    index=$i
    break
  fi
  i=$((i + 1))
done
# Otherwise the first free one.
if [ -z "$node" ]; then
  i=1
  while [ -d "$pki/devices/$prefix$i" ]; do
    if mkdir "$claims/$prefix$i" 2>/dev/null; then
      printf '%s\n' "$me" >"$claims/$prefix$i/owner"
      node=$prefix$i
      index=$i
      break
    fi
    i=$((i + 1))
  done
fi
if [ -z "$node" ]; then
  if [ "$i" -eq 1 ]; then
    say "no device identity $pki/devices/${prefix}1: issue them first (fleet certs device ./pki ${prefix}1 ...)"
  else
    say "all $((i - 1)) device identities ${prefix}1..${prefix}$((i - 1)) are claimed: issue more" \
      "(fleet certs device ./pki ${prefix}$i) or clear stale claims (see the top of this script)"
  fi
  sleep 10 # restart: unless-stopped would otherwise retry in a tight loop
  exit 1
fi

release() {
  rm -f "$claims/$node/owner"
  rmdir "$claims/$node" 2>/dev/null || true
}

for file in "$pki/ca.pem" "$pki/devices/$node/cert.pem" "$pki/devices/$node/key.pem"; do
  if [ ! -r "$file" ]; then
    release
    say "cannot read $file as uid $(id -u): chown $(id -u) pki/devices/${prefix}*/key.pem on the host"
    sleep 10
    exit 1
  fi
done

# Entry ((index - 1) mod count) + 1 of the list given after the index.
pick_broker() {
  position=$1
  shift
  [ $# -gt 0 ] || return 0
  shift $(((position - 1) % $#))
  printf '%s\n' "$1"
}
if [ -n "${FLEET_COMPOSE_BROKERS:-}" ] && [ -z "${FLEET_AGENT_SERVER_ADDR:-}" ]; then
  # shellcheck disable=SC2086 # the list is split into words on purpose
  FLEET_AGENT_SERVER_ADDR=$(pick_broker "$index" $FLEET_COMPOSE_BROKERS)
  if [ -n "$FLEET_AGENT_SERVER_ADDR" ]; then export FLEET_AGENT_SERVER_ADDR; else unset FLEET_AGENT_SERVER_ADDR; fi
fi

export FLEET_AGENT_NODE_ID="$node"
export FLEET_AGENT_TLS__CA="$pki/ca.pem"
export FLEET_AGENT_TLS__CERT="$pki/devices/$node/cert.pem"
export FLEET_AGENT_TLS__KEY="$pki/devices/$node/key.pem"
# The controller's control.pub (`fleet certs device` copies it into the device's directory): desired
# state and commands must be signed with its key, and the agent does not start without one.
if [ -z "${FLEET_AGENT_CONTROLLER_PUBLIC_KEY:-}" ] && [ -f "$pki/devices/$node/control.pub" ]; then
  export FLEET_AGENT_CONTROLLER_PUBLIC_KEY="$pki/devices/$node/control.pub"
fi
export FLEET_AGENT_STATE_DIR="$state/nodes/$node"
mkdir -p "$FLEET_AGENT_STATE_DIR"
say "claimed $node${FLEET_AGENT_SERVER_ADDR:+, broker $FLEET_AGENT_SERVER_ADDR}"

# fleet-agent runs as a child (not exec) so that the claim is released when it exits; signals are
# passed on: TERM/INT stop it (it stops its workload, then says goodbye), HUP reloads its config.
child=""
# shellcheck disable=SC2317 # called from the traps
forward() {
  if [ -n "$child" ]; then kill "-$1" "$child" 2>/dev/null || true; fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP
fleet-agent --config "$config" "$@" &
child=$!
status=0
wait "$child" || status=$?
# wait returns early when a trapped signal arrives: wait again until the agent has really exited.
while kill -0 "$child" 2>/dev/null; do
  status=0
  wait "$child" || status=$?
done
release
exit "$status"
