"""Independent checks of a finished federation: released adapters against a dense numpy FlexLoRA."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import torch
from peft.utils.other import get_pattern_key

from aggregator.rounds import GLOBAL_RELEASE, RoundStore
from schemas.messages import AdapterRelease, LoraUpdate
from schemas.tensors import decode_tensors


def module_rank(header: LoraUpdate | AdapterRelease, module: str) -> tuple[int, float]:
    """(rank, alpha) of one module by the header's rank and alpha patterns, resolved by peft's own function."""
    rank_key = get_pattern_key(list(header.rank_pattern), module)
    alpha_key = get_pattern_key(list(header.alpha_pattern), module)
    return header.rank_pattern.get(rank_key, header.rank), header.alpha_pattern.get(alpha_key, header.lora_alpha)


def _scale(header: LoraUpdate | AdapterRelease, module: str) -> float:
    rank, alpha = module_rank(header, module)
    return alpha / rank


def _factors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, np.ndarray]]:
    """module -> {"A": ..., "B": ...} from PEFT keys, parsed here without the project's helpers."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, t in tensors.items():
        stem, factor, _ = key.rsplit(".", 2)  # base_model.model.<module>.lora_A.weight
        out.setdefault(stem, {})[factor[-1]] = t.double().numpy()
    return out


def _carried(store: RoundStore, version: int) -> bool:
    """Did the round that made `version` take the server step that carries residuals (its record says so)?"""
    record = next((r for r in store.history() if r.version == version), None)
    return record is not None and "carried_versions" in record.metrics


def _global_dense(store: RoundStore, version: int) -> dict[str, np.ndarray] | None:
    """The global adapter committed at `version`, dense (None when there is none, or it was pruned)."""
    release = store.releases(version).get(GLOBAL_RELEASE) if version >= 1 else None
    if release is None:
        return None
    got = _factors(decode_tensors(store.payload(release), release.header.payload))
    return {m: _scale(release.header, _module(m)) * (f["B"] @ f["A"]) for m, f in got.items()}


def _module(key_stem: str) -> str:
    return key_stem.removeprefix("base_model.model.")


def _truncated(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    best: np.ndarray = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return best


def dense_update(store: RoundStore, version: int) -> dict[str, np.ndarray]:
    """`_dense` by module path (without PEFT's `base_model.model.` prefix)."""
    return {m.removeprefix("base_model.model."): d for m, d in _dense(store, version).items()}


def _dense(store: RoundStore, version: int) -> dict[str, np.ndarray]:
    """ΔW of every module for the round that produced `version`, formed densely from what it recorded: Σ p_k
    (α_k/r_k) B_k A_k (each module at its own rank and alpha where a client has rank patterns), plus, where the
    round carried residuals, Σ p_k (G_k − cut_{r_k}(G_k)) with G_k the global update k started
    from (aggregator.planning's server step, recomputed here by numpy SVDs)."""
    recorded = store.round_updates(version - 1)
    n = np.array([u.header.num_samples for u in recorded], dtype=np.float64)
    p = n / n.sum()
    per_client = [_factors(decode_tensors(store.payload(u))) for u in recorded]
    dense = {
        m: sum(
            pk * _scale(u.header, _module(m)) * (f[m]["B"] @ f[m]["A"])
            for pk, u, f in zip(p, recorded, per_client, strict=True)
        )
        for m in sorted(per_client[0])
    }
    if _carried(store, version):
        for pk, u in zip(p, recorded, strict=True):
            start = _global_dense(store, u.header.base_version)
            if start is None:
                continue
            for m in dense:
                g = start[m]
                dense[m] = dense[m] + pk * (g - _truncated(g, module_rank(u.header, _module(m))[0]))
    return dense


def assert_round_matches_dense(store: RoundStore, version: int, rel_tol: float = 1e-4) -> int:
    """Every release of `version` is the best rank-r cut of Σ p_k (α_k/r_k) B_k A_k over exactly the
    updates its round recorded (with the residuals it carried, see `dense_update`), module by module at the
    ranks its client's newest update stated (rank patterns included). Returns how many releases were checked."""
    recorded = store.round_updates(version - 1)
    assert recorded, f"round {version - 1} recorded no updates"
    dense = _dense(store, version)
    modules = sorted(dense)
    svds = {m: np.linalg.svd(d, full_matrices=False) for m, d in dense.items()}
    releases = store.releases(version)
    participants = set(releases) - {GLOBAL_RELEASE}
    assert participants == {u.header.client_id for u in recorded}, "one release per participant"
    for client_id, release in releases.items():
        h = release.header
        if client_id != GLOBAL_RELEASE:  # the global cut is checked at its own rank
            sent = [u.header for u in recorded if u.header.client_id == client_id][-1]
            asked = [module_rank(sent, _module(m))[0] for m in modules]
            released = [module_rank(h, _module(m))[0] for m in modules]
            assert released == asked, f"{client_id} trains ranks {asked} but got ranks {released}"
        got = _factors(decode_tensors(store.payload(release), release.header.payload))  # chunked ones too
        assert sorted(got) == modules
        for m in modules:
            rank, alpha = module_rank(h, _module(m))
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
