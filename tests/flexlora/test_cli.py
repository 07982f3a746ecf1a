"""The `flexlora` command line: structured logs and settings errors."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from typer.testing import CliRunner

from flexlora.cli import JsonFormatter, app


def test_json_logs_are_one_object_per_line_with_the_error() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("edge", logging.WARNING, __file__, 1, "lost %s", ("broker",), exc_info=None)
        import sys

        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["message"] == "lost broker" and entry["logger"] == "edge"
    assert "RuntimeError: boom" in entry["error"]
    assert "\n" not in line


def test_invalid_settings_exit_2_with_the_setting_named() -> None:
    result = CliRunner().invoke(app, ["client", "--client-id", "bad id!", "--model", "tiny"])
    assert result.exit_code == 2
    assert "client_id" in result.output
    result = CliRunner().invoke(app, ["aggregator", "--max-updates", "2", "--min-updates", "3"])
    assert result.exit_code == 2


def test_a_verbose_client_logs_its_own_progress_but_not_pikas() -> None:
    from flexlora.cli import _logging

    pika = logging.getLogger("pika.adapters.blocking_connection")
    root = logging.getLogger()
    before = logging.getLogger("pika").level, root.level
    try:
        _logging(verbose=True)
        root.setLevel(logging.INFO)  # what --verbose sets where no handler was installed before (pytest has one)
        assert logging.getLogger("edge_client.worker").isEnabledFor(logging.INFO)
        assert not pika.isEnabledFor(logging.ERROR), "a refused connection: a dozen lines from pika, one from us"
        assert logging.getLogger("broker.transports.rabbitmq").isEnabledFor(logging.WARNING)
    finally:
        logging.getLogger("pika").setLevel(before[0])
        root.setLevel(before[1])


def test_the_client_settings_and_the_worker_agree_on_how_long_to_wait_for_an_adapter() -> None:
    from edge_client.settings import ClientSettings
    from edge_client.worker import EdgeConfig

    worker_default = EdgeConfig("f", "c1", 4, 8.0, ("q_proj",), "a" * 64).adapter_timeout_s
    assert ClientSettings(client_id="c1").adapter_timeout_s == worker_default


# Settings that are not flags on purpose: a secret on the command line shows in `ps` and shell history, so the
# client's HMAC key is a variable (or an env file) only. Flags that are not settings drive the command itself.
VARIABLE_ONLY = {"client": {"signing_key"}, "aggregator": set()}
COMMAND_FLAGS = {"check", "log_format", "verbose"}
PLURAL_FLAGS = {"target_module": "target_modules", "task": "tasks"}  # repeated flags, one setting


def test_every_setting_is_a_flag_and_every_flag_a_setting() -> None:
    import typer.main

    from aggregator.settings import AggregatorSettings
    from edge_client.settings import ClientSettings

    command = typer.main.get_command(app)
    for name, settings in (("aggregator", AggregatorSettings), ("client", ClientSettings)):
        flags = {PLURAL_FLAGS.get(p.name or "", p.name) for p in command.commands[name].params}  # type: ignore[attr-defined]
        assert set(settings.model_fields) - VARIABLE_ONLY[name] == flags - COMMAND_FLAGS, name


def test_new_aggregator_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr("aggregator.app.run_aggregator", lambda settings: seen.setdefault("s", settings))
    args = ["aggregator", "--max-rank", "64", "--require-identity", "--max-weight-share", "0.5", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    settings = seen["s"]
    assert (settings.max_rank, settings.require_identity, settings.max_weight_share) == (64, True, 0.5)
