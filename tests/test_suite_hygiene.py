"""The suite's own hygiene: the end-of-suite check finds a queue a test left on the shared broker."""

from __future__ import annotations

import shutil

import pika
import pytest

from tests.conftest import AMQP_URL, leftover_queues


@pytest.mark.services
@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="the check asks rabbitmqctl")
def test_the_end_of_suite_check_names_a_queue_left_behind(federation: str) -> None:
    name = f"flexlora.{federation}.adapters.forgotten"
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = conn.channel()
        channel.queue_declare(name, durable=True)
        assert leftover_queues({federation}, attempts=2) == [name]
        assert leftover_queues({"t-another-federation"}, attempts=1) == []
        channel.queue_delete(name)
        assert leftover_queues({federation}, attempts=1) == []
    finally:
        conn.close()


def test_the_readme_refusal_table_lists_every_reason_an_aggregator_refuses_for() -> None:
    import re
    from pathlib import Path

    from schemas.errors import Reason

    readme = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    table = readme[readme.index("| reason | what |") :].split("\n\n", 1)[0]
    listed = {name for row in table.splitlines()[2:] for name in re.findall(r"`([a-z-]+)`", row.split("|")[1])}
    client_side = {Reason.MISROUTED, Reason.ADAPTER_MISMATCH, Reason.INVALID}
    assert listed == {r.value for r in Reason} - client_side
