"""How many Redis replicas must hold a write before the message it came from is acked (issue: a failover must not
lose an acked update)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Replication:
    """Writes that lead to an ack wait (Redis WAIT) until `replicas` replicas hold them, for at most `timeout_s`."""

    replicas: int = 0  # 0: do not wait (a single Redis, or asynchronous replication accepted)
    timeout_s: float = 1.0

    def __post_init__(self) -> None:
        if self.replicas < 0 or not self.timeout_s > 0:
            raise ValueError(f"invalid replication requirement {self}")


NO_WAIT = Replication()  # a single Redis, or asynchronous replication accepted
