"""`flexlora demo`, small: the federation runs its rounds, scores every one, and leaves nothing behind."""

from __future__ import annotations

import pika
import pytest
import redis
from rich.console import Console

from broker.topology import Topology
from flexlora.demo import DemoConfig, run_demo
from tests.conftest import AMQP_URL, REDIS_URL

SMALL = DemoConfig(model="tiny", ranks=(2, 4), rounds=2, local_steps=2, batch_size=4, samples_per_task=4)


def test_the_embedded_demo_scores_the_base_and_every_round() -> None:
    result = run_demo(SMALL, Console(quiet=True))
    assert [r.version for r in result.records] == [1, 2]
    assert len(result.scores) == 3 and all(0.0 <= s <= 1.0 for s in result.scores)
    assert all(sorted(p.rank for p in r.participants) == [2, 4] for r in result.records)


@pytest.mark.services
def test_the_demo_over_rabbitmq_and_redis_leaves_no_queues_or_keys() -> None:
    from dataclasses import replace

    result = run_demo(replace(SMALL, broker_url=AMQP_URL, redis_url=REDIS_URL), Console(quiet=True))
    assert [r.version for r in result.records] == [1, 2]
    assert not list(redis.Redis.from_url(REDIS_URL).scan_iter(f"*{result.federation}*", count=1000))
    topology = Topology(result.federation)
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        for queue in [topology.updates_queue, topology.adapter_queue("client-0"), topology.adapter_queue("client-1")]:
            channel = conn.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker):  # 404: the demo deleted it
                channel.queue_declare(queue, passive=True)
    finally:
        conn.close()
