"""Independent checks of a finished federation: released adapters against a dense numpy FlexLoRA."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import torch

from aggregator.rounds import GLOBAL_RELEASE, RoundStore
from schemas.tensors import decode_tensors


def _factors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, np.ndarray]]:
    """module -> {"A": ..., "B": ...} from PEFT keys, parsed here without the project's helpers."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, t in tensors.items():
        stem, factor, _ = key.rsplit(".", 2)  # base_model.model.<module>.lora_A.weight
        out.setdefault(stem, {})[factor[-1]] = t.double().numpy()
    return out


def dense_update(store: RoundStore, version: int) -> dict[str, np.ndarray]:
    """ΔW of every module for the round that produced `version`, formed densely from what it recorded."""
    recorded = store.round_updates(version - 1)
    n = np.array([u.header.num_samples for u in recorded], dtype=np.float64)
    per_client = [_factors(decode_tensors(store.payload(u))) for u in recorded]
    return {
        m.removeprefix("base_model.model."): sum(
            pk * (u.header.lora_alpha / u.header.rank) * (f[m]["B"] @ f[m]["A"])
            for pk, u, f in zip(n / n.sum(), recorded, per_client, strict=True)
        )
        for m in sorted(per_client[0])
    }


def assert_round_matches_dense(store: RoundStore, version: int, rel_tol: float = 1e-4) -> int:
    """Every release of `version` is the best rank-r cut of Σ p_k (α_k/r_k) B_k A_k over exactly the
    updates its round recorded. Returns how many releases were checked."""
    recorded = store.round_updates(version - 1)
    assert recorded, f"round {version - 1} recorded no updates"
    n = np.array([u.header.num_samples for u in recorded], dtype=np.float64)
    p = n / n.sum()
    per_client = [_factors(decode_tensors(store.payload(u))) for u in recorded]
    modules = sorted(per_client[0])
    dense = {
        m: sum(
            pk * (u.header.lora_alpha / u.header.rank) * (f[m]["B"] @ f[m]["A"])
            for pk, u, f in zip(p, recorded, per_client, strict=True)
        )
        for m in modules
    }
    svds = {m: np.linalg.svd(d, full_matrices=False) for m, d in dense.items()}
    releases = store.releases(version)
    participants = set(releases) - {GLOBAL_RELEASE}
    assert participants == {u.header.client_id for u in recorded}, "one release per participant"
    for client_id, release in releases.items():
        rank, alpha = release.header.rank, release.header.lora_alpha
        if client_id != GLOBAL_RELEASE:  # the global cut is checked at its own rank
            wanted_rank = [u.header.rank for u in recorded if u.header.client_id == client_id][-1]
            assert rank == wanted_rank, f"{client_id} trains rank {wanted_rank} but got rank {rank}"
        got = _factors(decode_tensors(store.payload(release), release.header.payload))  # chunked ones too
        assert sorted(got) == modules
        for m in modules:
            a, b = got[m]["A"], got[m]["B"]
            assert a.shape == (rank, dense[m].shape[1]) and b.shape == (dense[m].shape[0], rank)
            u_, s_, vt_ = svds[m]
            best = (u_[:, :rank] * s_[:rank]) @ vt_[:rank]
            err = float(np.linalg.norm((alpha / rank) * (b @ a) - best)) / max(float(np.linalg.norm(best)), 1e-12)
            assert err <= rel_tol, f"{client_id} {m}: relative error {err:.2e}"
    return len(participants)


def rabbit_queue_counts(federation: str) -> dict[str, tuple[int, int]]:
    """(ready, unacked) of every queue of the federation, read from the broker itself."""
    out = subprocess.run(
        [
            "rabbitmqctl",
            "list_queues",
            "-q",
            "--formatter",
            "json",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows = json.loads(out)
    return {
        r["name"]: (int(r["messages_ready"]), int(r["messages_unacknowledged"]))
        for r in rows
        if f".{federation}." in r["name"]
    }
