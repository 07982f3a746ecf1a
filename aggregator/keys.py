"""Every Redis key of a federation, under one namespace, so several federations can share one Redis.

The namespace carries the federation as a Redis Cluster hash tag (`flexlora:{name}:…`): only the part between
the braces is hashed, so every key of a federation lives in one slot. The Lua scripts touch several keys in
one atomic step and a transaction reads several together, which Redis Cluster allows only within one slot; a
federation is therefore served by one primary of a cluster, and many federations spread over its primaries.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.ranks import RankRequest


@dataclass(frozen=True)
class Keys:
    federation: str
    prefix: str = "flexlora"

    @property
    def namespace(self) -> str:
        """The prefix of every key (hash-tagged by the federation: one Redis Cluster slot for all of them)."""
        return f"{self.prefix}:{{{self.federation}}}:"

    @property
    def legacy_namespace(self) -> str:
        """The prefix before keys were hash-tagged; aggregator.stores.redis moves such keys on start-up."""
        return f"{self.prefix}:{self.federation}:"

    def _k(self, *parts: str | int) -> str:
        return self.namespace + ":".join(map(str, parts))

    @property
    def version(self) -> str:  # int: the newest committed global version; round N builds version N+1
        return self._k("version")

    @property
    def seen(self) -> str:  # set of every record id (aggregator.rounds.record_id) recorded: the exactly-once guard
        return self._k("seen")

    def round_updates(self, round_id: int) -> str:  # list of record ids, in arrival order
        return self._k("round", round_id, "updates")

    def round_opened(self, round_id: int) -> str:  # float: when the round's first update arrived
        return self._k("round", round_id, "opened")

    def round_norms(self, round_id: int) -> str:  # list of the ‖ΔW‖ of the round's accepted updates
        return self._k("round", round_id, "norms")

    # Updates and transfers are named by their record id ("client/update id"): update ids are per client.
    def update(self, rid: str) -> str:  # hash: header (JSON), payload (the key below)
        return self._k("update", rid)

    def update_payload(self, rid: str, sha256: str) -> str:  # safetensors bytes of one update
        return self._k("update", rid, "payload", sha256)

    def transfer(self, rid: str) -> str:  # hash: chunk index -> bytes, of an update still arriving
        return self._k("transfer", rid)

    def transfer_meta(self, rid: str) -> str:  # hash: signature, client, count of a transfer
        return self._k("transfer", rid, "meta")

    @property
    def transfers_open(self) -> str:  # sorted set: record id -> when its transfer expires unless a chunk comes
        return self._k("transfers")

    @property
    def transfer_owners(self) -> str:  # hash: record id -> client, of every open transfer (bounds per client)
        return self._k("transfer-owners")

    def staged(self, name: str) -> str:  # hash of chunks written before a commit adopts (renames) it
        return self._k("staged", name)

    def lease(self, round_id: int) -> str:  # "owner:token" with a TTL: who finalises the round now
        return self._k("round", round_id, "lease")

    def fence(self, round_id: int) -> str:  # the newest token issued for the round; commits must carry it
        return self._k("round", round_id, "fence")

    @property
    def tokens(self) -> str:  # counter that issues fencing tokens
        return self._k("tokens")

    def releases(self, version: int) -> str:  # hash: client id -> AdapterRelease JSON
        return self._k("release", version)

    def adapter_prefix(self, version: int) -> str:
        return self._k("adapter", version) + ":"

    @property
    def pruned_below(self) -> str:  # int: versions below this have had their payloads pruned
        return self._k("pruned-below")

    def adapter(self, version: int, request: RankRequest) -> str:  # safetensors of one cut, shared by clients
        # Cuts with rank patterns get their digest appended; uniform ones keep the key they always had.
        parts = (request.tag,) if request.tag else ()
        return self._k("adapter", version, request.rank, repr(float(request.alpha)), *parts)

    @property
    def unpublished(self) -> str:  # set of committed versions whose adapters are not yet all published
        return self._k("unpublished")

    def publish_claim(self, version: int) -> str:  # who publishes a version's adapters now (with a TTL)
        return self._k("release", version, "claim")

    @property
    def history(self) -> str:  # list of RoundRecord JSON, one per committed round
        return self._k("history")

    def health(self, owner: str) -> str:  # JSON with a TTL: this aggregator is alive
        return self._k("health", owner)

    @property
    def refusals(self) -> str:  # hash: dead-letter reason -> how many updates were refused for it
        return self._k("refusals")

    @property
    def pins(self) -> str:  # hash of facts fixed by the first accepted update (base model, module shapes)
        return self._k("pins")

    @property
    def payload_store(self) -> str:  # marker of the file the federation's first payload-store aggregator wrote
        return self._k("payload-store")
