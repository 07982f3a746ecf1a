"""Least-privilege client users, on a RabbitMQ node of the test's own with the management API: what a
provisioned client may do (publish an update, consume its own mailbox) and what the broker refuses it."""

from __future__ import annotations

import logging
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from typer.testing import CliRunner

from broker.connect import connect
from broker.errors import BrokerError
from broker.provision import (
    ClientAccess,
    ManagementAPI,
    Outcome,
    ProvisionError,
    client_permissions,
    client_username,
    provision_clients,
    rabbit_password_hash,
    with_credentials,
)
from broker.topology import UPDATE_ROUTING_KEY, Topology
from broker.transports.rabbitmq import RabbitMQTransport
from schemas.settings import check_environment
from tests.faults.servers import OwnRabbitMQ, ServerUnavailable, own_rabbitmq

pytestmark = [pytest.mark.services, pytest.mark.slow]
ACCESS_REFUSED, PRECONDITION_FAILED = 403, 406


@pytest.fixture(scope="module")
def node() -> Iterator[OwnRabbitMQ]:
    try:
        with own_rabbitmq(management=True) as started:
            yield started
    except ServerUnavailable as exc:
        pytest.skip(f"no private RabbitMQ node here: {exc}")


@pytest.fixture
def topology() -> Topology:
    return Topology(f"p{uuid.uuid4().hex[:10]}")


@pytest.fixture
def clients(node: OwnRabbitMQ, topology: Topology) -> dict[str, ClientAccess]:
    api = ManagementAPI.from_urls(node.management_url, node.url)
    with connect(node.url) as admin:
        made = provision_clients(api, admin, topology, ["c1", "c2"], vhost="/")
    return {a.client_id: a for a in made}


def _channel(node: OwnRabbitMQ, access: ClientAccess) -> tuple[pika.BlockingConnection, BlockingChannel]:
    conn = pika.BlockingConnection(pika.URLParameters(access.broker_url(node.url)))
    channel = conn.channel()
    channel.confirm_delivery()
    return conn, channel


def _refusal(node: OwnRabbitMQ, access: ClientAccess, action: Callable[[BlockingChannel], Any]) -> int:
    """The reply code with which the broker closed the channel on `action` (0 if it did not)."""
    conn, channel = _channel(node, access)
    try:
        action(channel)
    except pika.exceptions.ChannelClosedByBroker as exc:
        return int(exc.reply_code)
    finally:
        if conn.is_open:
            conn.close()
    return 0


def test_a_client_may_publish_updates_and_read_its_own_mailbox(
    node: OwnRabbitMQ, topology: Topology, clients: dict[str, ClientAccess]
) -> None:
    c1 = clients["c1"]
    assert c1.username == client_username(topology, "c1") and c1.outcome is Outcome.CREATED
    with RabbitMQTransport(c1.broker_url(node.url)) as transport:
        transport.publish(topology.updates_exchange, UPDATE_ROUTING_KEY, b"update", {}, message_id="u1")
    with connect(node.url) as admin:
        assert admin.queue_depth(topology.updates_queue) == 1
        admin.publish(topology.adapters_exchange, "c1", b"adapter", {})
    conn, channel = _channel(node, c1)
    try:
        _, properties, body = channel.basic_get(topology.adapter_queue("c1"), auto_ack=True)
        assert body == b"adapter" and properties.user_id == "guest"
    finally:
        conn.close()
    # What the aggregators see: the broker-stamped user of the publisher, not something the client chose.
    with connect(node.url) as admin:
        sub = admin.subscribe(topology.updates_queue, prefetch=1, dead_letter_exchange=topology.dead_letter_exchange)
        delivery = sub.get(5)
        assert delivery is not None and delivery.message.user_id == c1.username
        delivery.ack()
        sub.close()


def test_the_broker_refuses_everything_else(
    node: OwnRabbitMQ, topology: Topology, clients: dict[str, ClientAccess]
) -> None:
    c1, t = clients["c1"], topology
    # (a) another client's mailbox: neither consume nor get
    assert _refusal(node, c1, lambda ch: ch.basic_consume(t.adapter_queue("c2"), lambda *a: None)) == ACCESS_REFUSED
    assert _refusal(node, c1, lambda ch: ch.basic_get(t.adapter_queue("c2"))) == ACCESS_REFUSED
    # (b) any exchange but the updates exchange: adapters (forging an adapter), dead-letter, the default one
    for exchange, key in [
        (t.adapters_exchange, "c2"),
        (t.dead_letter_exchange, ""),
        ("", t.updates_queue),
        ("", t.adapter_queue("c2")),
        ("amq.direct", "x"),
    ]:
        code = _refusal(node, c1, lambda ch, e=exchange, k=key: ch.basic_publish(e, k, b"forged"))  # type: ignore[misc]
        assert code == ACCESS_REFUSED, (exchange, key)
    # (c) configure nothing: not even re-declaring or deleting its own mailbox, nor a queue or exchange of its own
    own = t.adapter_queue("c1")
    args = cast(dict[str, Any], t.client("c1")[1].arguments)  # type: ignore[union-attr]
    for action in [
        lambda ch: ch.queue_declare(own, durable=True, arguments=args),
        lambda ch: ch.queue_declare(f"flexlora.{t.federation}.mine", durable=True),
        lambda ch: ch.queue_declare("", exclusive=True),
        lambda ch: ch.exchange_declare(t.updates_exchange, "direct", durable=True),
        lambda ch: ch.queue_bind(own, t.updates_exchange, "update"),
        lambda ch: ch.queue_bind(t.updates_queue, t.adapters_exchange, "c2"),
        lambda ch: ch.queue_delete(own),
        lambda ch: ch.exchange_delete(t.updates_exchange),
    ]:
        assert _refusal(node, c1, action) == ACCESS_REFUSED
    # Through the project's transport the same refusals surface as BrokerError.
    with RabbitMQTransport(c1.broker_url(node.url)) as transport:
        with pytest.raises(BrokerError, match="403"):
            transport.publish(t.adapters_exchange, "c2", b"forged", {})
        with pytest.raises(BrokerError, match="403"):
            transport.declare(t.client("c1"))
    with connect(node.url) as admin:
        assert admin.queue_depth(t.adapter_queue("c2")) == 0, "nothing forged reached c2"


def test_the_broker_refuses_a_user_id_other_than_the_connections_user(
    node: OwnRabbitMQ, topology: Topology, clients: dict[str, ClientAccess]
) -> None:
    """RabbitMQ's own check: the `user_id` property, if set, must be the authenticated user."""
    t = topology

    def publish_as(user_id: str) -> Callable[[BlockingChannel], None]:
        props = pika.BasicProperties(user_id=user_id, delivery_mode=2)
        return lambda ch: ch.basic_publish(t.updates_exchange, UPDATE_ROUTING_KEY, b"u", props, mandatory=True)

    assert _refusal(node, clients["c1"], publish_as(clients["c2"].username)) == PRECONDITION_FAILED
    assert _refusal(node, clients["c1"], publish_as("guest")) == PRECONDITION_FAILED
    assert _refusal(node, clients["c1"], publish_as(clients["c1"].username)) == 0


def test_rerunning_keeps_or_rotates_passwords_and_repairs_permissions(
    node: OwnRabbitMQ, topology: Topology, clients: dict[str, ClientAccess]
) -> None:
    api = ManagementAPI.from_urls(node.management_url, node.url)
    c1 = clients["c1"]
    api.set_permissions("/", c1.username, client_permissions(topology, "c2"))  # drifted by hand
    with connect(node.url) as admin:
        again = provision_clients(api, admin, topology, ["c1"], vhost="/")
        assert [(a.outcome, a.password) for a in again] == [(Outcome.KEPT, None)]
        assert api.permissions("/", c1.username) == client_permissions(topology, "c1")
        RabbitMQTransport(c1.broker_url(node.url)).close()  # the kept password still works
        rotated = provision_clients(api, admin, topology, ["c1"], vhost="/", rotate=True)[0]
    assert rotated.outcome is Outcome.ROTATED and rotated.password not in (None, c1.password)
    RabbitMQTransport(rotated.broker_url(node.url)).close()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(c1.broker_url(node.url)))


def test_refuses_to_touch_a_tagged_user_and_never_logs_a_password(
    node: OwnRabbitMQ, topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    api = ManagementAPI.from_urls(node.management_url, node.url)
    name = client_username(topology, "boss")
    api._checked("PUT", "users", name, body={"password_hash": rabbit_password_hash("x"), "tags": "administrator"})
    caplog.set_level(logging.DEBUG)
    with connect(node.url) as admin:
        with pytest.raises(ProvisionError, match="refusing to demote"):
            provision_clients(api, admin, topology, ["boss"], vhost="/")
        made = provision_clients(api, admin, topology, ["c3"], vhost="/")
    assert made[0].password is not None and made[0].password not in repr(made) + caplog.text
    assert api.delete_user(name) and api.delete_user(made[0].username)


def test_the_command_writes_private_env_files_a_client_can_use(
    node: OwnRabbitMQ, topology: Topology, tmp_path: Path
) -> None:
    from flexlora.cli import app

    args = ["provision", "--federation", topology.federation, "--broker-url", node.url]
    args += ["--management-url", node.management_url, "--out", str(tmp_path), "--client-id", "phone-1"]
    args += ["--signing-keys", str(tmp_path / "keys.json")]
    result = CliRunner().invoke(app, [*args, "--client-id", "laptop-1"])
    assert result.exit_code == 0, result.output
    env_file = tmp_path / "phone-1.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if line and not line.startswith("#"))
    check_environment(env)  # every FLEXLORA_* name is a known setting
    assert env["FLEXLORA_FEDERATION"] == topology.federation and env["FLEXLORA_CLIENT_ID"] == "phone-1"
    from aggregator.security import load_signing_keys

    keys = load_signing_keys(tmp_path / "keys.json")  # what the aggregators read
    assert set(keys) == {"phone-1", "laptop-1"} and keys["phone-1"].hex() == env["FLEXLORA_SIGNING_KEY"]
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    password = pika.URLParameters(env["FLEXLORA_BROKER_URL"]).credentials.password
    assert password not in result.output
    with RabbitMQTransport(env["FLEXLORA_BROKER_URL"]) as transport:
        transport.publish(topology.updates_exchange, UPDATE_ROUTING_KEY, b"u", {})
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "kept" in again.output
    assert env_file.read_text().count(password) == 1, "a re-run leaves the credentials in place"
    assert load_signing_keys(tmp_path / "keys.json") == keys, "and the signing keys"
    assert with_credentials(node.url, "a", "b").startswith("amqp://a:b@127.0.0.1:")


def test_an_edge_worker_starts_with_provisioned_credentials(
    node: OwnRabbitMQ, topology: Topology, clients: dict[str, ClientAccess]
) -> None:
    from edge_client.worker import EdgeConfig, EdgeWorker

    config = EdgeConfig(topology.federation, "c1", 4, 8.0, ("q_proj",), "f" * 64)
    with RabbitMQTransport(clients["c1"].broker_url(node.url)) as transport:
        worker = EdgeWorker(transport, cast(Any, None), config)
        worker.setup()
        worker.close()


def test_a_provisioned_worker_drops_an_adapter_it_refuses_and_loads_the_next(
    node: OwnRabbitMQ, topology: Topology, clients: dict[str, ClientAccess]
) -> None:
    # It may not publish to the dead-letter exchange: the refused adapter must not stay unacked in front.
    import torch

    from edge_client.worker import EdgeConfig, EdgeWorker
    from schemas.lora import LoraFactors, join_lora
    from schemas.messages import HEADER_KEY, AdapterRelease
    from schemas.tensors import encode_tensors

    def release(version: int, rank: int) -> tuple[bytes, dict[str, str]]:
        data, info = encode_tensors(
            join_lora({"model.layers.0.self_attn.q_proj": LoraFactors(torch.ones(rank, 8), torch.ones(8, rank))})
        )
        header = AdapterRelease(
            federation=topology.federation,
            version=version,
            client_id="c1",
            rank=rank,
            lora_alpha=8.0,
            target_modules=("q_proj",),
            base_model_fingerprint="f" * 64,
            num_updates=1,
            payload=info,
        )
        return data, {HEADER_KEY: header.model_dump_json()}

    class Loader:
        loaded: dict[str, torch.Tensor] | None = None

        def load(self, tensors: dict[str, torch.Tensor]) -> None:
            self.loaded = tensors

    with connect(node.url) as admin:
        for body, headers in (release(1, 8), release(2, 4)):  # the first is cut at a rank c1 does not train
            admin.publish(topology.adapters_exchange, "c1", body, headers)
    config = EdgeConfig(topology.federation, "c1", 4, 8.0, ("q_proj",), "f" * 64)
    loader = Loader()
    with RabbitMQTransport(clients["c1"].broker_url(node.url)) as transport:
        worker = EdgeWorker(transport, cast(Any, loader), config)
        worker.setup()
        got = worker.wait_for_adapter(timeout_s=30)
        worker.close()
    assert got is not None and got.version == 2 and loader.loaded is not None
