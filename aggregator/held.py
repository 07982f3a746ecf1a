"""Updates this aggregator recorded, kept decoded in its memory until a round it finalises counts them.

Every update's bytes are in the round store: that is what makes any aggregator able to finalise any round.
But the one that finalises usually recorded many of the round's updates itself (all of them with a single
aggregator), and reading them back costs a transfer of every byte out of the store and a second decode
(measured on the paper-scale load: 45% of the finaliser's time went to reading payloads back from Redis). So
each aggregator keeps the factors it validated, under a byte budget, and the finaliser asks the store only for
the payloads it does not hold. What is held is a cache, never the record: an entry is used only for the update
id *and* payload sha256 that the store's record names, and a crashed aggregator loses nothing but the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from aggregator.rounds import record_id
from schemas.lora import LoraFactors
from schemas.messages import LoraUpdate


@dataclass(frozen=True)
class _Entry:
    sha256: str
    factors: Mapping[str, LoraFactors]
    nbytes: int
    round_id: int  # the round open when it was recorded: it counts in that one or a later one


def factors_bytes(factors: Mapping[str, LoraFactors]) -> int:
    return sum(f.A.nbytes + f.B.nbytes for f in factors.values())


class HeldUpdates:
    """Decoded factors of recorded updates by record id (aggregator.rounds.record_id: update ids are each
    client's own), oldest dropped first past `budget_bytes` (0: hold none). One thread uses it: the service's (ingest
    records, the finaliser takes)."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def hold(self, header: LoraUpdate, factors: Mapping[str, LoraFactors], round_id: int) -> None:
        """Keep a just-recorded update's factors (`round_id`: the round open when it was recorded), if they fit."""
        size = factors_bytes(factors)
        if size > self.budget_bytes:
            return
        key = record_id(header.client_id, header.update_id)
        self._drop(key)
        self._entries[key] = _Entry(header.payload.sha256, factors, size, round_id)
        self.nbytes += size
        while self.nbytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))

    def ids(self) -> frozenset[str]:
        """The record id of every update held."""
        return frozenset(self._entries)

    def take(self, header: LoraUpdate) -> Mapping[str, LoraFactors] | None:
        """The held factors of exactly this recorded update (its client, its id and its payload's sha256), no
        longer held after; None when not held."""
        key = record_id(header.client_id, header.update_id)
        entry = self._entries.get(key)
        if entry is None or entry.sha256 != header.payload.sha256:
            return None
        self._drop(key)
        return entry.factors

    def forget_before(self, round_id: int) -> None:
        """Drop what was recorded while a round before `round_id - 1` was open: those rounds are committed by
        now (another aggregator counted them), and no later round can count the same update."""
        for key in [k for k, e in self._entries.items() if e.round_id < round_id - 1]:
            self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
