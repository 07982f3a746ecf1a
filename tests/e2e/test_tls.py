"""A federation over TLS only: amqps:// to a RabbitMQ node and rediss:// to a Redis (no plain port at all) of the
test's own, with a throwaway CA; servers are verified (a client trusting another CA is refused), and a device may
log in by its certificate alone (EXTERNAL), as `flexlora provision --ca-cert` issues it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import trustme

from aggregator.config import AggregatorConfig
from aggregator.rounds import RoundPolicy
from aggregator.service import AggregatorService
from aggregator.stores import open_store
from aggregator.stores.redis import RedisRoundStore
from broker.certificates import issue_device_certificate
from broker.connect import connect
from broker.errors import BrokerError
from broker.tls import TlsFiles
from broker.topology import Topology
from edge_client.synthetic import SyntheticShape, publish_update, synthetic_update
from schemas.messages import HEADER_KEY, SHARED_RELEASE, parse_release
from tests.e2e.procs import wait_for
from tests.edge_client.test_resilience import ServiceThread
from tests.faults.servers import OwnRabbitMQ, OwnRedis, ServerTls, ServerUnavailable

SMALL = SyntheticShape(layers=2, projections=(("self_attn.q_proj", 64, 48),))
DEVICE = "device-1"  # a device that logs in by its certificate: the certificate's common name is its broker user


@dataclass
class Pki:
    ca: TlsFiles  # what every process trusts
    device: TlsFiles  # the device's own certificate, for mutual TLS
    stranger: TlsFiles  # trusts another CA only


@dataclass
class Servers:
    rabbit: OwnRabbitMQ
    redis: OwnRedis
    pki: Pki


def _write(directory: Path, name: str, pem: bytes) -> Path:
    path = directory / name
    path.write_bytes(pem)
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    d = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    # The device's certificate as `flexlora provision --ca-cert` issues it.
    device = issue_device_certificate(ca.cert_pem.bytes(), ca.private_key_pem.bytes(), DEVICE)
    ca_file = _write(d, "ca.pem", ca.cert_pem.bytes())
    files = ServerTls(
        ca_file,
        _write(d, "server.pem", b"".join(p.bytes() for p in server.cert_chain_pems)),
        _write(d, "server.key", server.private_key_pem.bytes()),
    )
    pki = Pki(
        TlsFiles(ca_file),
        TlsFiles(
            ca_file,
            _write(d, "device.pem", device.cert_pem),
            _write(d, "device.key", device.key_pem),
        ),
        TlsFiles(_write(d, "other-ca.pem", other.cert_pem.bytes())),
    )
    try:
        rabbit = OwnRabbitMQ(tls=files, external_auth=True)
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    store = OwnRedis(d / "redis", appendonly=False, tls=files)
    try:
        rabbit.start()
        store.start()
        rabbit.ctl("add_user", DEVICE, "unused")
        rabbit.ctl("clear_password", DEVICE)
        rabbit.ctl("set_permissions", "-p", "/", DEVICE, ".*", ".*", ".*")
        yield Servers(rabbit, store, pki)
    finally:
        store.close()
        rabbit.close()


def test_a_round_runs_over_tls_only_and_a_device_logs_in_by_its_certificate(servers: Servers) -> None:
    federation = "tls"
    ca = servers.pki.ca
    store = open_store(servers.redis.url, federation, tls=ca)
    assert isinstance(store, RedisRoundStore)
    config = AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=2), poll_s=0.05)
    serving = ServiceThread(AggregatorService(connect(servers.rabbit.tls_url, tls=ca), store, config))
    # A device with a password over TLS, and one with its certificate only (no password in its URL).
    laptop = connect(servers.rabbit.tls_url, tls=ca)
    port = servers.rabbit.tls_port
    device = connect(f"amqps://{DEVICE}@127.0.0.1:{port}/%2F", tls=servers.pki.device)
    topology = Topology(federation)
    try:
        for transport, client in ((laptop, "laptop-1"), (device, DEVICE)):
            transport.declare(topology.client(client))
            header, payload = synthetic_update(federation, client, 4, 0, shape=SMALL, seed=len(client))
            publish_update(transport, topology, header, payload)
        wait_for(lambda: store.version() == 1, timeout=60, what="the round committed over TLS")
        sub = device.subscribe(
            topology.adapter_queue(DEVICE), prefetch=1, dead_letter_exchange=topology.dead_letter_exchange
        )
        try:
            got = sub.get(30.0)
            assert got is not None, "the device's adapter did not arrive"
            release = parse_release(got.message.headers[HEADER_KEY])
            # Both clients train at rank 4, so one cut serves both: a release shared by them, or the device's own.
            assert release.client_id in (DEVICE, SHARED_RELEASE)
            assert (release.version, release.rank) == (1, 4)
            got.ack()
        finally:
            sub.close()
        counted = {p.client_id for p in store.history()[0].participants}
        assert counted == {"laptop-1", DEVICE}
    finally:
        serving.close()
        laptop.close()
        device.close()
        serving.service.transport.close()
        store.wipe()
    assert not serving.errors, serving.errors


def test_servers_are_verified_and_nothing_travels_in_clear(servers: Servers) -> None:
    with pytest.raises(BrokerError):  # the broker's certificate is not signed by the CA this client trusts
        connect(servers.rabbit.tls_url, tls=servers.pki.stranger)
    with pytest.raises(redis.ConnectionError):
        open_store(servers.redis.url, "tls", tls=servers.pki.stranger).version()
    with pytest.raises(redis.ConnectionError):  # no plain port: a redis:// client cannot even talk to it
        open_store(servers.redis.url.replace("rediss://", "redis://"), "tls").version()
    with pytest.raises(BrokerError, match="amqps://"):  # TLS files with a clear-text URL are a mistake, said so
        connect(servers.rabbit.url, tls=servers.pki.ca)
    with pytest.raises(ValueError, match="certificate file"):
        TlsFiles(key_file=servers.pki.device.key_file)
