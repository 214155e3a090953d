"""The fleet controller: registry, commands, desired state, rollouts, release service, HTTP API.

Assembled by ``fleet.controller.service.Controller``; each module owns one concept. Nothing here
is imported by the agent, the broker or the PKI (one layers contract in pyproject.toml).
"""
