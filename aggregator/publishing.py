"""Sending a committed version's adapters to the participants' mailboxes, and declaring those mailboxes.

A round's turnaround (last update in → every adapter in its mailbox) ends here, so the slow parts are taken off
its path: the mailboxes a round will need are declared on a thread of their own while the round is aggregated
(`declare_ahead`), all in one call, and the adapters are published from the releases just committed rather than
read back from the store.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from pydantic import TypeAdapter, ValidationError

from aggregator.metrics import AggregatorMetrics
from aggregator.releasing import send_release, shared_cuts
from aggregator.rounds import GLOBAL_RELEASE, Blob, RoundStore, StoredRelease
from broker.errors import BrokerError, ConnectionLost
from broker.topology import Topology
from broker.transport import Message, Transport
from schemas.errors import Reason
from schemas.messages import DETAIL_KEY, HEADER_KEY, REASON_KEY, REFUSED_KEY, ClientId

log = logging.getLogger(__name__)
_CLIENT_ID = TypeAdapter(ClientId)  # the headers' own bound on a client id
# Refusals after which the named client is not told: nothing shows the message came from it (and a fault of
# ours, "internal", may have come before the sender's checks).
_SENDER_UNPROVEN = frozenset(
    {
        Reason.HEADER_SIZE,
        Reason.SCHEMA,
        Reason.FEDERATION,
        Reason.IDENTITY,
        Reason.SIGNATURE,
        Reason.REPLAY,
        Reason.INTERNAL,
    }
)


def tell_refused(
    transport: Transport, topology: Topology, client_id: str, update_id: str, reason: str, detail: str
) -> None:
    """Put a notice that `update_id` was refused in its client's mailbox, if the client has one (a notice never
    makes a mailbox), so the client stops waiting for an adapter that will not come and says why. Best effort:
    the dead letter is the record, and a client that misses the notice times out as before."""
    headers = {REFUSED_KEY: update_id, REASON_KEY: reason, DETAIL_KEY: detail[:1000]}
    try:
        transport.publish(topology.adapters_exchange, client_id, b"", headers, message_id=f"refused:{update_id}")
    except BrokerError as exc:  # no mailbox (unroutable), refused, or the connection gone: nobody told
        log.debug("could not tell %s that update %s was refused: %s", client_id, update_id, exc)


class Publisher:
    """Publishes versions for one aggregator process; its mailbox declarations are remembered for its life."""

    def __init__(
        self,
        transport: Transport,
        store: RoundStore,
        topology: Topology,
        metrics: AggregatorMetrics,
        *,
        owner: str,
        chunk_bytes: int,
        claim_s: float,
        require_identity: bool = False,
    ) -> None:
        self.transport, self.store, self.topology, self.metrics = transport, store, topology, metrics
        self.owner, self.chunk_bytes, self.claim_s = owner, chunk_bytes, claim_s
        self.require_identity = require_identity  # refusal notices only where the broker user is the client
        self._declared: set[str] = set()
        self._declaring_thread = ThreadPoolExecutor(1, thread_name_prefix="mailboxes")
        self._declaring: Future[None] | None = None

    def declare_ahead(self, clients: Sequence[str]) -> None:
        """Start declaring these clients' mailboxes on the declaring thread; `publish` waits for it. (A client that
        sent an update declared its own mailbox already, so declaring it before its round commits creates
        nothing the client would not have; the declaration matters when that client's queue was deleted.)"""
        self._await_declaring()
        self._declaring = self._declaring_thread.submit(self._declare, list(clients))

    def publish(self, version: int, committed: Mapping[str, StoredRelease] | None = None) -> None:
        """Publish a committed version's adapters, unless another aggregator holds the claim to do it. `committed`:
        the clients' releases as this process just committed them (None: read them back from the store)."""
        if not self.store.claim_publish(version, self.owner, self.claim_s):
            return
        if version not in self.store.unpublished():  # published by another since the caller read it pending
            return
        releases = committed
        if releases is None:
            releases = {c: r for c, r in self.store.releases(version).items() if c != GLOBAL_RELEASE}
        self._await_declaring()
        self._declare(sorted(releases))
        # One message per distinct cut, routed by the broker to every mailbox that takes it.
        for release, clients in shared_cuts(releases):
            ready = [c for c in clients if c in self._declared]
            if not ready:
                continue
            try:
                send_release(
                    self.transport, self.topology, self.store, release, chunk_bytes=self.chunk_bytes, recipients=ready
                )
            except ConnectionLost:
                raise
            except BrokerError:
                # Refused as a whole (no mailbox took it): declare them afresh next time; joins catch them up.
                self._declared.difference_update(ready)
                log.exception("could not publish version %d at rank %d", version, release.header.rank)
                continue
            for _ in ready:
                self.metrics.published()
        self.store.mark_published(version)

    def tell_refused(self, message: Message, reason: str, detail: str) -> None:
        """`tell_refused` for a dead-lettered update whose header names its client and update id, unless the
        refusal means the sender may not be that client (its identity, signature or header did not check out, or
        the id was counted with other bytes: a replay), the federation requires identities and the broker user
        is not the client's, or that update id was counted (a redelivered copy refused for the round's state
        since: its client must not drop an update that counts)."""
        if reason in _SENDER_UNPROVEN:
            return
        try:
            fields = json.loads(message.headers.get(HEADER_KEY) or "null")
        except (ValueError, RecursionError):  # a header nested past the stack is refused "schema" first
            return
        client, update = (fields.get("client_id"), fields.get("update_id")) if isinstance(fields, dict) else (0, 0)
        if not (isinstance(update, str) and update):
            return
        try:
            client = _CLIENT_ID.validate_python(client)
        except ValidationError:
            return
        if self.require_identity and message.user_id != self.topology.client_user(client):
            return
        if self.store.counted(client, update):
            return
        tell_refused(self.transport, self.topology, client, update[:128], reason, detail)

    def answer_join(self, release: StoredRelease) -> None:
        """Send a join's answer into the client's mailbox without declaring it (PublishRefused if there is none)."""
        send_release(self.transport, self.topology, self.store, release, chunk_bytes=self.chunk_bytes)

    def close(self) -> None:
        """Stop declaring, once a declaration under way has finished: none may land after the process has left
        (on a broker where the federation's queues were deleted meanwhile, it would make them again)."""
        self._declaring_thread.shutdown(wait=True, cancel_futures=True)

    def _declare(self, clients: Sequence[str]) -> None:
        """Declare, once per process, the mailboxes of `clients`: all in one call (one channel, 50 mailboxes in
        85 ms where one call each took 211 ms), or, when the broker refuses that (a mailbox declared with other
        arguments closes the channel), one by one. A refusing mailbox must not hold back the others' adapters, nor
        fail every publication again: it is tried afresh next time, and a join catches its client up."""
        new = [c for c in clients if c not in self._declared]
        if not new:
            return
        try:
            self.transport.declare([spec for c in new for spec in self.topology.client(c)])
        except ConnectionLost:
            raise
        except BrokerError:
            for client_id in new:
                try:
                    self.transport.declare(self.topology.client(client_id))
                except ConnectionLost:
                    raise
                except BrokerError:
                    log.exception("could not declare the mailbox of %s; skipping it", client_id)
                    continue
                self._declared.add(client_id)
            return
        self._declared.update(new)

    def _await_declaring(self) -> None:
        """Wait for the declarations started ahead; what they could not declare is tried again by the caller."""
        pending, self._declaring = self._declaring, None
        if pending is None:
            return
        try:
            pending.result()
        except ConnectionLost:
            raise
        except BrokerError:
            log.warning("declaring the round's mailboxes failed; trying again", exc_info=True)


def committed_releases(releases: Sequence[StoredRelease]) -> dict[str, StoredRelease] | None:
    """The clients' releases, to publish as committed, when they are all held here; None when one is staged in the
    store (the commit moved its chunks to the version's own key, so it is read back from there)."""
    if any(isinstance(r.payload, Blob) for r in releases):
        return None
    return {r.header.client_id: r for r in releases if r.header.client_id != GLOBAL_RELEASE}
