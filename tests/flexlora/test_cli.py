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
