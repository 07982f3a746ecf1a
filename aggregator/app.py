"""Assemble the aggregator process from settings and keep it serving through broker outages."""

from __future__ import annotations

import logging
import signal
import threading

from prometheus_client import start_http_server
from tenacity import retry, retry_if_exception_type, stop_when_event_set, wait_exponential

from aggregator.config import config_from_settings
from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from aggregator.stores import open_store
from broker.connect import connect, say_retrying, sleeping_until
from broker.errors import BrokerError

log = logging.getLogger(__name__)


def run_aggregator(settings: AggregatorSettings, stop: threading.Event | None = None) -> None:
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    store = open_store(
        settings.redis_url,
        settings.federation,
        tls=settings.tls_files(),
        replication=settings.replication(),
        payloads=settings.payloads(),
    )
    config = config_from_settings(settings)
    # One set of metrics for the process's life: counters keep counting across reconnects.
    metrics = AggregatorMetrics(settings.federation)
    if settings.metrics_port is not None:
        server, _ = start_http_server(settings.metrics_port, registry=metrics.registry)
        log.info("metrics at http://0.0.0.0:%d/metrics", server.server_port)

    # Deliveries held when the connection drops go back to the queue; the store makes their second
    # arrival a no-op, so reconnecting and carrying on is always safe. Any broker error does that, not only a
    # lost connection (a channel the broker closed, a publish it refused): the process never exits for one,
    # and neither for Redis being unreachable while it starts; it logs a line, backs off and serves again.
    # SIGTERM or Ctrl-C ends the back-off at once: a process waiting for a broker that never comes still stops.
    @retry(
        retry=retry_if_exception_type((BrokerError, *store.transient_errors)),
        wait=wait_exponential(multiplier=0.5, max=15),
        stop=stop_when_event_set(stop),
        sleep=sleeping_until(stop),
        before_sleep=say_retrying(log),
        retry_error_callback=lambda _: None,  # stopped while backing off
    )
    def serve() -> None:
        if stop.is_set():  # asked to stop during the back-off: no attempt more (one may wait out a timeout)
            return
        transport = connect(
            settings.broker_url, heartbeat=settings.heartbeat_s, connection_name=config.owner, tls=settings.tls_files()
        )
        log.info("aggregator %s serving federation %r", config.owner, settings.federation)
        try:
            AggregatorService(transport, store, config, metrics=metrics).run(stop)
        finally:
            transport.close()

    serve()


def check_health(settings: AggregatorSettings, host: str | None = None) -> tuple[bool, list[str]]:
    """Is an aggregator of this federation alive (on `host`, when given)? For compose health checks."""
    store = open_store(
        settings.redis_url, settings.federation, tls=settings.tls_files(), replication=settings.replication()
    )
    live = store.health()
    mine = sorted(o for o in live if host is None or o.split(":", 1)[0] == host)
    return bool(mine), mine
