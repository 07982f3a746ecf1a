"""The FLEXLORA_ environment guard: typos refused with a hint, every role's real names accepted."""

from __future__ import annotations

import pytest

from aggregator.settings import AggregatorSettings
from edge_client.settings import ClientSettings
from schemas.settings import KNOWN_NAMES, check_environment


def test_known_names_cover_every_setting_of_every_role() -> None:
    fields = set(AggregatorSettings.model_fields) | set(ClientSettings.model_fields)
    assert fields <= KNOWN_NAMES, f"add {sorted(fields - KNOWN_NAMES)} to schemas.settings.KNOWN_NAMES"


def test_a_typo_is_refused_with_the_intended_name() -> None:
    with pytest.raises(ValueError, match=r"FLEXLORA_RANKK is not a setting \(did you mean FLEXLORA_RANK\?\)"):
        check_environment({"FLEXLORA_RANKK": "8", "FLEXLORA_RANK": "4", "PATH": "/bin"})
    check_environment({"FLEXLORA_REDIS_URL": "redis://x", "FLEXLORA_CLIENT_ID": "c", "HOME": "/root"})


def test_settings_refuse_a_misspelt_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXLORA_LOCAL_STEP", "3")
    with pytest.raises(ValueError, match="did you mean FLEXLORA_LOCAL_STEPS"):
        ClientSettings(client_id="c1")
    monkeypatch.delenv("FLEXLORA_LOCAL_STEP")
    monkeypatch.setenv("FLEXLORA_LOCAL_STEPS", "3")
    monkeypatch.setenv("FLEXLORA_REDIS_URL", "redis://elsewhere:6379/0")  # an aggregator's, shared .env
    assert ClientSettings(client_id="c1").local_steps == 3
