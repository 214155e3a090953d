"""agent.mqtt: the asyncio MQTT adapter under the agent and ``fleet sim``, against real brokers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from agent.mqtt import Inbound, MqttClient, Options, Will, tls_context
from certs import issue_device
from fleet.protocol.errors import TransportError
from fleet.protocol.topics import Channel, node_topic
from tests.conftest import Pki, free_port
from tests.mqtt import Endpoint, connected

pytestmark = pytest.mark.timeout(60)


def options(pki: Pki, endpoint: Endpoint, node: str, **changes: object) -> Options:
    paths = pki.paths.device(node)
    if not paths.cert.exists():
        issue_device(pki.paths, node)
    values: dict[str, object] = {
        "client_id": node,
        "host": endpoint.host,
        "port": endpoint.port,
        "keepalive": 5,
        "tls": tls_context(pki.paths.ca_cert, paths.cert, paths.key),
        "connect_timeout": 5,
    }
    return Options(**(values | changes))  # type: ignore[arg-type]


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - the predicates read what callbacks record
            await asyncio.sleep(0.01)


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


def test_many_clients_on_one_loop_without_a_thread_each(pki: Pki, embedded: Endpoint) -> None:
    count = 40
    nodes = [f"adp-{index:03d}" for index in range(count)]
    received: dict[str, bytes] = {}
    with connected(embedded, pki.controller()) as controller:

        async def main() -> None:
            threads_before = threading.active_count()

            def keep(node: str) -> Callable[[Inbound], None]:
                return lambda inbound: received.__setitem__(node, inbound.payload)

            clients = [MqttClient(options(pki, embedded, node), on_message=keep(node)) for node in nodes]
            with ThreadPoolExecutor(4) as pool:
                ids = await asyncio.gather(*(client.connect(pool) for client in clients))
                assert len(set(ids)) == count  # every connection has its own id
                # The pool's 4 workers at most: no client has a network thread.
                assert threading.active_count() <= threads_before + 4
            try:
                for client, node in zip(clients, nodes, strict=True):
                    client.subscribe([(node_topic(node, Channel.DESIRED), 1)])
                await asyncio.sleep(0.5)  # SUBACKs
                for node in nodes:
                    await asyncio.to_thread(controller.publish, node_topic(node, Channel.DESIRED), node.encode())
                await until(lambda: len(received) == count)
                assert received == {node: node.encode() for node in nodes}
                sent = [client.publish(node_topic(node, Channel.HEARTBEAT), b"{}", qos=1) for client in clients]
                await asyncio.wait_for(asyncio.gather(*sent), 10)  # every PUBACK resolved its future
            finally:
                for client in clients:
                    client.disconnect()
                await asyncio.gather(*(client.wait_closed(5) for client in clients))
                for client in clients:
                    client.close()

        run(main)


def test_an_ack_goes_only_to_the_connection_that_delivered(pki: Pki, broker: Endpoint) -> None:
    """A QoS-1 command left unacknowledged when the link dropped is redelivered on the next
    connection; the stale inbound cannot be acked there, the redelivered one can."""
    node = "gw-b"
    inbox: list[Inbound] = []
    lost: list[int] = []
    with connected(broker, pki.operator("alice")) as operator:

        async def main() -> None:
            client = MqttClient(
                options(pki, broker, node, manual_ack=True),
                on_message=inbox.append,
                on_lost=lambda connection, _reason: lost.append(connection),
            )
            first = await client.connect()
            client.subscribe([(node_topic(node, Channel.CMD), 1)])
            await asyncio.sleep(0.5)
            await asyncio.to_thread(operator.publish, node_topic(node, Channel.CMD), b'{"id":"c1","action":"ping"}')
            await until(lambda: len(inbox) == 1)
            assert inbox[0].connection == first
            assert client.drop()
            await until(lambda: lost == [first])
            assert not client.connected
            second = await client.connect()
            assert second != first
            await until(lambda: len(inbox) == 2)  # redelivered: it was never acknowledged
            stale, fresh = inbox
            assert fresh.connection == second and fresh.payload == stale.payload
            assert client.ack(stale) is False
            assert client.ack(fresh) is True
            client.disconnect()
            assert await client.wait_closed(5)
            assert lost == [first]  # our own DISCONNECT is not a loss
            client.close()

        run(main)


def test_publish_futures_and_the_will(pki: Pki, embedded: Endpoint) -> None:
    node = "gw-a"
    status = node_topic(node, Channel.STATUS)
    with connected(embedded, pki.operator("alice")) as operator:
        operator.subscribe(status)

        async def main() -> None:
            client = MqttClient(
                options(pki, embedded, node, will=Will(status, b"gone", qos=1, retain=False)), on_message=print
            )
            await client.connect()
            await asyncio.wait_for(client.publish(status, b"here", qos=1), 5)  # resolved by the PUBACK
            await asyncio.wait_for(client.publish(status, b"fast", qos=0), 5)  # resolved once written
            client.drop()  # no DISCONNECT: the broker publishes the will
            await until(lambda: not client.connected)
            with pytest.raises(TransportError, match="not connected"):
                client.publish(status, b"late", qos=1)
            client.close()

        run(main)
        operator.expect(lambda m: m.topic == status and m.payload == b"here")
        operator.expect(lambda m: m.topic == status and m.payload == b"gone")


def test_pending_publishes_fail_when_the_connection_ends(pki: Pki, embedded: Endpoint) -> None:
    async def main() -> None:
        client = MqttClient(options(pki, embedded, "gw-a"), on_message=print)
        await client.connect()
        pending = client.publish(node_topic("gw-a", Channel.STATUS), b"x", qos=1)
        client.close()
        with pytest.raises(TransportError):
            await pending

    run(main)


def test_failed_connects_raise_transport_errors(pki: Pki, embedded: Endpoint) -> None:
    async def main() -> None:
        nobody = Endpoint("none", "127.0.0.1", free_port())
        client = MqttClient(options(pki, nobody, "gw-a"), on_message=print)
        with pytest.raises(TransportError, match="connect failed"):
            await client.connect()
        foreign = pki.foreign.device("gw-a")
        untrusted = options(pki, embedded, "gw-a", tls=tls_context(pki.paths.ca_cert, foreign.cert, foreign.key))
        client = MqttClient(untrusted, on_message=print)
        with pytest.raises(TransportError):
            await client.connect()
        client.close()

    run(main)
