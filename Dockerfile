# One image for `fleet controller` (and the rest of the `fleet` CLI) and `fleet-agent`.
#   docker build -t fleet-mqtt:local .        (docker-compose.yml builds it as fleet-mqtt:local)
#   docker run --rm fleet-mqtt:local --help
# Only the package sources are copied (no .venv, build/, tests, bench/), so no .dockerignore is
# needed for correctness; one would still shrink the context sent to the daemon.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md /tmp/fleet-src/
COPY fleet /tmp/fleet-src/fleet
COPY agent /tmp/fleet-src/agent
COPY broker /tmp/fleet-src/broker
COPY certs /tmp/fleet-src/certs
# The [server] extra: controller, broker and the `fleet` CLI (the base install is the agent's alone;
# this image runs both, see docker-compose.yml). `fleet broker --help` imports the broker (amqtt),
# so a missing server library fails the build rather than the first container.
RUN pip install '/tmp/fleet-src[server]' \
    && rm -rf /tmp/fleet-src \
    && fleet --help >/dev/null \
    && fleet broker --help >/dev/null \
    && fleet-agent --version

# uid/gid 10001: make the private keys the containers read owned by it, e.g.
#   chown 10001 pki/controller.key pki/devices/gw-compose-*/key.pem
# /data (controller database), /releases (release store) and /var/lib/fleet-agent (agent state)
# are created here so that named volumes mounted on them start out owned by this user.
RUN groupadd --system --gid 10001 fleet \
    && useradd --system --uid 10001 --gid fleet --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin fleet \
    && mkdir -p /data /releases /var/lib/fleet-agent /etc/fleet-agent \
    && chown fleet:fleet /data /releases /var/lib/fleet-agent

USER fleet
WORKDIR /data
ENTRYPOINT ["fleet"]
CMD ["--help"]
