"""A round that cannot be aggregated because of one update drops that update instead of failing forever.

When finalising raises (and not because Redis or the broker is away), each update of the round is tried
alone against today's bounds, the federation's pins and the strategy itself; the ones that fail are taken
out of the round, counted as refused ("aggregation"), and a record of each (its header, an empty body and
the reason) goes to the dead-letter queue. Their ids stay seen, so a redelivery is never counted later.
"""

from __future__ import annotations

import json
import logging

from aggregator.participants import client_adapters
from aggregator.planning import global_request, scaled
from aggregator.publishing import tell_refused
from aggregator.registry import strategy_spec
from aggregator.rounds import Lease, RecordedUpdate, RoundStore
from aggregator.strategies import Strategy, finite_result
from aggregator.validation import PIN_FINGERPRINT, PIN_MODULES
from broker.topology import UPDATE_ROUTING_KEY, Topology
from broker.transport import Transport
from schemas.errors import Reason
from schemas.lora import module_shapes
from schemas.messages import DETAIL_KEY, HEADER_KEY, REASON_KEY, LoraUpdate
from schemas.recipe import DEFAULT_RECIPE, Recipe

log = logging.getLogger(__name__)
REASON = Reason.AGGREGATION


def find_culprits(
    store: RoundStore,
    strategy: Strategy,
    recorded: list[RecordedUpdate],
    global_rank: int = 0,
    recipe: Recipe = DEFAULT_RECIPE,
    server_lr: float = 1.0,
) -> list[tuple[LoraUpdate, str]]:
    """Each update of a round that fails on its own, with why it cannot be aggregated: cut at its own rank and,
    where the strategy releases a global cut, at the round's (a larger rank at a smaller alpha / rank makes the
    same ΔW larger factors: an update finite at its own cut can overflow only in the global one)."""
    fingerprint, shapes = store.pinned(PIN_FINGERPRINT), store.pinned(PIN_MODULES)
    nested = strategy_spec(strategy.name).nested_cuts
    requests = [item.header.request for item in recorded]
    out = []
    for item in recorded:
        h = item.header
        try:
            LoraUpdate.model_validate_json(h.model_dump_json())  # an update stored before today's bounds
            if fingerprint is not None and h.base_model_fingerprint != fingerprint:
                raise ValueError("its base model is not the federation's")
            (client,) = client_adapters(store, [item])
            own = json.dumps({m: list(s) for m, s in module_shapes(client.factors).items()}, sort_keys=True)
            if shapes is not None and own != shapes:
                raise ValueError("its module shapes are not the federation's")
            cuts = [h.request]
            if nested:
                cuts.append(global_request(requests, list(client.factors), global_rank, recipe))
            finite_result(scaled(strategy.aggregate([client], [1.0], cuts), server_lr))
        except store.transient_errors:
            raise
        except Exception as exc:
            out.append((h, f"{type(exc).__name__}: {exc}"[:400]))
    return out


def drop_culprits(
    store: RoundStore,
    transport: Transport,
    topology: Topology,
    strategy: Strategy,
    lease: Lease,
    global_rank: int = 0,
    recipe: Recipe = DEFAULT_RECIPE,
    server_lr: float = 1.0,
) -> list[str]:
    """Take the updates that cannot be aggregated out of the leased round; returns the ids dropped. `global_rank`,
    `recipe` and `server_lr`: the round's, which its global cut and its scale depend on."""
    round_id = lease.round_id
    recorded = store.round_updates(round_id)
    dropped = []
    for header, detail in find_culprits(store, strategy, recorded, global_rank, recipe, server_lr):
        update_id = header.update_id
        if not store.drop_update(lease, header.client_id, update_id):
            continue  # the round moved on meanwhile, or another aggregator took its lease
        log.error("round %d: dropping update %s from %s: %s", round_id, update_id, header.client_id, detail)
        headers = {HEADER_KEY: header.model_dump_json(), REASON_KEY: REASON, DETAIL_KEY: detail}
        try:
            transport.publish(topology.dead_letter_exchange, UPDATE_ROUTING_KEY, b"", headers, message_id=update_id)
        except Exception:  # the count in the store is the record that matters; the copy is for inspection
            log.warning("could not put a record of dropped update %s in the dead-letter queue", update_id)
        tell_refused(transport, topology, header.client_id, update_id, REASON, detail)
        dropped.append(update_id)
    return dropped
