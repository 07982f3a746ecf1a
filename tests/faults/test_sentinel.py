"""Highly available Redis: a primary, a replica and three Sentinels of the test's own. The aggregator finds the
primary through the sentinels (`redis+sentinel://`) and waits for a replica on every record (`min_replicas`).
The primary is SIGKILLed in the middle of a burst of updates; Sentinel promotes the replica, the aggregator
follows it, and the old primary comes back as the new one's replica. Every update published is counted once:
0 lost, 0 counted twice, 0 unexpected. The same again with TLS only: no plain port on any Redis or Sentinel,
replication and Sentinel's own connections over TLS too (`rediss+sentinel://`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import trustme

from aggregator.stores import open_store
from aggregator.stores.redis import RedisRoundStore
from aggregator.stores.replication import Replication
from broker.connect import connect
from broker.tls import TlsFiles
from broker.topology import Topology
from edge_client.synthetic import publish_update, synthetic_update
from tests.conftest import AMQP_URL
from tests.e2e.procs import wait_for
from tests.faults.servers import OwnRedis, OwnSentinel, ServerTls, ServerUnavailable
from tests.faults.test_replication import SMALL, Serving

pytestmark = [pytest.mark.services]
NAME = "flexlora"


@dataclass
class Ha:
    primary: OwnRedis
    replica: OwnRedis
    sentinels: list[OwnSentinel]
    tls: TlsFiles | None = None

    @property
    def url(self) -> str:
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{NAME}/0"


def _server_tls(directory: Path) -> ServerTls:
    """A throwaway CA and a certificate for loopback, as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    files = ServerTls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_file.write_bytes(ca.cert_pem.bytes())
    files.cert_file.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    files.key_file.write_bytes(cert.private_key_pem.bytes())
    return files


@contextmanager
def _ha(tmp_path: Path, tls: ServerTls | None) -> Iterator[Ha]:
    try:
        primary = OwnRedis(tmp_path / "primary", appendonly=False, tls=tls)
        primary.start()
    except ServerUnavailable as exc:
        pytest.skip(f"no private Redis here: {exc}")
    replica = OwnRedis(tmp_path / "replica", appendonly=False, replica_of=primary.port, tls=tls)
    replica.start()
    sentinels = [OwnSentinel(tmp_path / f"sentinel-{i}", primary.port, name=NAME, tls=tls) for i in range(3)]
    try:
        for s in sentinels:
            s.start()

        def ready() -> bool:
            info = primary.client().info("replication")
            return info.get("connected_slaves") == 1 and all(
                len(cast(list[Any], s.client().sentinel_slaves(NAME))) == 1
                and len(cast(list[Any], s.client().sentinel_sentinels(NAME))) == 2
                for s in sentinels
            )

        wait_for(ready, 60, "the replica in sync and every sentinel knowing the others")
        yield Ha(primary, replica, sentinels, TlsFiles(tls.ca_file) if tls else None)
    finally:
        for s in sentinels:
            s.close()
        replica.close()
        primary.close()


@pytest.fixture(params=["plain", "tls"])
def ha(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ha]:
    with _ha(tmp_path, _server_tls(tmp_path / "pki") if request.param == "tls" else None) as servers:
        yield servers


def _counted(store: RedisRoundStore) -> list[str]:
    return [i for r in range(store.version() + 1) for i in store.round_update_ids(r)]


def _in_sync_with_a_primary(server: OwnRedis) -> bool:
    try:
        info = server.client().info("replication")
    except redis.RedisError:
        return False
    return info.get("role") == "slave" and info.get("master_link_status") == "up"


def _counted_now(store: RedisRoundStore) -> list[str] | None:
    """What the test reads while it waits: None while the sentinels have no primary to name (mid-failover)."""
    try:
        return _counted(store)
    except redis.exceptions.ConnectionError:  # MasterNotFoundError among them
        return None


def test_the_primary_killed_mid_burst_sentinel_promotes_the_replica_and_nothing_is_lost(
    federation: str, amqp_cleanup: list[str], ha: Ha
) -> None:
    store = open_store(ha.url, federation, tls=ha.tls, replication=Replication(replicas=1, timeout_s=0.5))
    assert isinstance(store, RedisRoundStore)  # as the aggregator opens it
    topology = Topology(federation)
    serving = Serving(federation, store)
    client = connect(AMQP_URL)
    published: list[str] = []
    try:
        for n in range(12):
            header, payload = synthetic_update(federation, f"c{n % 4}", 4, 0, shape=SMALL, seed=n)
            publish_update(client, topology, header, payload)
            published.append(header.update_id)
            if n == 5:
                wait_for(lambda: len(_counted_now(store) or ()) >= 3, 30, "a few updates recorded before the kill")
                ha.primary.kill()
        wait_for(lambda: ha.sentinels[0].primary_port() == ha.replica.port, 60, "Sentinel promoting the replica")
        ha.primary.start()  # back, empty: Sentinel makes it the new primary's replica, so WAIT is answered again
        wait_for(
            lambda: len(_counted_now(store) or ()) == len(published), 90, "every update counted on the new primary"
        )
        wait_for(lambda: client.queue_depth(topology.updates_queue) == 0, 30, "nothing left to record")
        # What makes records safe again (WAIT answered): without it every later update is only held, never acked.
        wait_for(lambda: _in_sync_with_a_primary(ha.primary), 90, "the old primary back as the new one's replica")
        counted = _counted(store)
        lost = set(published) - set(counted)
        twice = len(counted) - len(set(counted))
        unexpected = set(counted) - set(published)
        print(
            f"sentinel failover ledger: published {len(published)}, lost {len(lost)}, twice {twice}, "
            f"unexpected {len(unexpected)}"
        )
        assert (lost, twice, unexpected) == (set(), 0, set())
    finally:
        serving.close()
        client.close()
        store.wipe()
