"""`flexlora export`: any committed global version comes out as a PEFT directory transformers can load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from typer.testing import CliRunner

from aggregator.rounds import RoundRecord, StoredRelease
from aggregator.stores.redis import RedisRoundStore
from edge_client.model import adapter_state, tiny_model, wrap_lora
from flexlora.cli import app
from schemas.messages import AdapterRelease, LoraUpdate, PayloadInfo
from schemas.tensors import encode_tensors
from tests.conftest import REDIS_URL


def _commit_version(store: RedisRoundStore, federation: str) -> dict[str, dict[str, torch.Tensor]]:
    """Commit version 1 with releases at ranks 4 and 8 built from real PEFT state dicts of the tiny model."""
    base = tiny_model()
    store.record(
        LoraUpdate(
            federation=federation,
            client_id="c4",
            base_version=0,
            rank=4,
            lora_alpha=8.0,
            num_samples=1,
            target_modules=("q_proj", "v_proj"),
            base_model_fingerprint=base.fingerprint,
            payload=PayloadInfo(size=0, sha256="0" * 64),
        ),
        b"",
        now=1.0,
    )
    lease = store.acquire(0, "test", ttl_s=30)
    assert lease is not None
    releases, states = [], {}
    for client, rank in (("c4", 4), ("c8", 8)):
        model = wrap_lora(tiny_model().model, rank, 2.0 * rank, ["q_proj", "v_proj"], seed=rank)
        state = {k: torch.randn_like(v) for k, v in adapter_state(model).items()}
        data, info = encode_tensors(state)
        header = AdapterRelease(
            federation=federation,
            version=1,
            client_id=client,
            rank=rank,
            lora_alpha=2.0 * rank,
            target_modules=("q_proj", "v_proj"),
            base_model_fingerprint=base.fingerprint,
            num_updates=2,
            payload=info,
        )
        releases.append(StoredRelease(header, data))
        states[client] = state
    record = RoundRecord(
        version=1,
        strategy="flexlora",
        participants=[],
        opened_at=1.0,
        closed_at=2.0,
        aggregate_seconds=0.1,
        finalised_by="t",
    )
    assert store.commit(lease, 1, releases, record, now=2.0)
    return states


@pytest.mark.services
def test_export_writes_a_loadable_peft_adapter(federation: str, tmp_path: Path) -> None:
    store = RedisRoundStore.from_url(REDIS_URL, federation)
    try:
        states = _commit_version(store, federation)
        runner = CliRunner()
        for args, client in ((["--rank", "4"], "c4"), ([], "c8"), (["--client-id", "c4", "--version", "1"], "c4")):
            out = tmp_path / f"out-{client}-{len(args)}"
            result = runner.invoke(
                app, ["export", "--federation", federation, "--redis-url", REDIS_URL, "--out", str(out), *args]
            )
            assert result.exit_code == 0, result.output
            loaded = PeftModel.from_pretrained(tiny_model().model, str(out))
            got = get_peft_model_state_dict(loaded)
            assert set(got) == set(states[client])
            assert all(torch.equal(got[k], states[client][k]) for k in got)
        missing = runner.invoke(
            app,
            [
                "export",
                "--federation",
                federation,
                "--redis-url",
                REDIS_URL,
                "--out",
                str(tmp_path / "x"),
                "--rank",
                "16",
            ],
        )
        assert missing.exit_code == 2
        assert "released at ranks [4, 8]" in missing.output
        # the federation and its store from FLEXLORA_* variables, as every other command reads them (export once
        # read federation "default" whatever the environment said)
        env = {"FLEXLORA_FEDERATION": federation, "FLEXLORA_REDIS_URL": REDIS_URL, "FLEXLORA_LOG_FORMAT": "json"}
        from_env = runner.invoke(app, ["export", "--out", str(tmp_path / "from-env")], env=env)
        assert from_env.exit_code == 0, from_env.output
        assert "version 1, rank 8" in from_env.output
    finally:
        store.wipe()
