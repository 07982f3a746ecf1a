"""The `flexlora` command line: structured logs and settings errors."""

from __future__ import annotations

import json
import logging

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


def test_a_verbose_client_logs_its_own_progress_but_only_pikas_warnings() -> None:
    from flexlora.cli import _logging

    pika = logging.getLogger("pika.adapters.blocking_connection")
    root = logging.getLogger()
    before = logging.getLogger("pika").level, root.level
    try:
        _logging(verbose=True)
        root.setLevel(logging.INFO)  # what --verbose sets where no handler was installed before (pytest has one)
        assert logging.getLogger("edge_client.worker").isEnabledFor(logging.INFO)
        assert not pika.isEnabledFor(logging.INFO) and pika.isEnabledFor(logging.WARNING)
    finally:
        logging.getLogger("pika").setLevel(before[0])
        root.setLevel(before[1])


def test_the_client_settings_and_the_worker_agree_on_how_long_to_wait_for_an_adapter() -> None:
    from edge_client.settings import ClientSettings
    from edge_client.worker import EdgeConfig

    worker_default = EdgeConfig("f", "c1", 4, 8.0, ("q_proj",), "a" * 64).adapter_timeout_s
    assert ClientSettings(client_id="c1").adapter_timeout_s == worker_default
