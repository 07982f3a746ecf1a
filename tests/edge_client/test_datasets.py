"""Tests for loading local instruction data from JSONL files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge_client.datasets import DataError, load_jsonl
from edge_client.tasks import Example


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_records(path: Path, records: list[dict[str, Any]]) -> Path:
    return write_lines(path, [json.dumps(r) for r in records])


def test_alpaca_style(tmp_path: Path) -> None:
    path = write_records(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Name a colour.", "output": "red"},
        ],
    )
    assert load_jsonl(path) == [
        Example("Add the numbers.", "2 and 3", "5"),
        Example("Name a colour.", "", "red"),
    ]


def test_dolly_style(tmp_path: Path) -> None:
    path = write_records(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Summarise.", "context": "Cats sleep a lot.", "response": "Cats nap.", "category": "x"},
            {"instruction": "Say hi.", "response": "hi"},
        ],
    )
    assert load_jsonl(path) == [Example("Summarise.", "Cats sleep a lot.", "Cats nap."), Example("Say hi.", "", "hi")]


def test_natural_instructions_style(tmp_path: Path) -> None:
    path = write_records(
        tmp_path / "ni.jsonl",
        [
            {"definition": "Reverse the word.", "input": "cat", "output": "tac"},
            {"definition": "Uppercase it.", "input": "dog", "output": ["", "  ", "DOG", "Dog"]},
        ],
    )
    assert load_jsonl(path) == [Example("Reverse the word.", "cat", "tac"), Example("Uppercase it.", "dog", "DOG")]


def test_prompt_completion_style(tmp_path: Path) -> None:
    path = write_records(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": " 4"}])
    assert load_jsonl(path) == [Example("2+2=", "", "4")]


def test_mixed_styles_blank_lines_and_surrounding_whitespace(tmp_path: Path) -> None:
    lines = [
        json.dumps({"instruction": "  A ", "input": " x ", "output": " y\n"}),
        "",
        "   ",
        json.dumps({"instruction": "B", "context": "c", "response": "r"}),
        json.dumps({"definition": "C", "input": "i", "output": ["o1", "o2"]}),
        json.dumps({"prompt": "D", "completion": "inner  space kept"}),
    ]
    path = write_lines(tmp_path / "mix.jsonl", lines)
    assert load_jsonl(path) == [
        Example("A", "x", "y"),
        Example("B", "c", "r"),
        Example("C", "i", "o1"),
        Example("D", "", "inner  space kept"),
    ]


def test_null_input_and_crlf_and_bom_accepted(tmp_path: Path) -> None:
    path = tmp_path / "win.jsonl"
    body = json.dumps({"instruction": "A", "input": None, "output": "b"}) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode() + body.encode())
    assert load_jsonl(path) == [Example("A", "", "b")] * 2


def test_malformed_lines_reported_with_line_numbers_and_count(tmp_path: Path) -> None:
    good = json.dumps({"instruction": "A", "output": "b"})
    lines = [good, "{not json", good, good, json.dumps({"instruction": "A", "output": "  "}), good]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert str(path) in message
    assert "2 malformed line(s)" in message
    assert "line 2: not valid JSON" in message
    assert "line 5: 'output' is empty" in message
    assert [n for n, _ in info.value.line_errors] == [2, 5]
    for n in (1, 3, 4, 6):
        assert f"line {n}:" not in message


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("[1, 2]", "expected a JSON object, got array"),
        ('"text"', "expected a JSON object, got string"),
        ('{"output": "b"}', "no instruction field"),
        ('{"instruction": "A", "input": "x"}', "no output field"),
        ('{"instruction": "A", "output": 3}', "'output' must be a string or a list of strings, got number"),
        ('{"instruction": "A", "output": ["", " "]}', "'output' is empty"),
        ('{"instruction": "A", "output": ["ok", 1]}', "'output' list items must be strings, got number"),
        ('{"instruction": "A", "input": 7, "output": "b"}', "'input' must be a string, got number"),
        ('{"instruction": "", "output": "b"}', "'instruction' is empty"),
        ('{"prompt": null, "completion": "b"}', "'prompt' must be a string, got null"),
        ('{"instruction": "A", "response": ["b"]}', "'response' must be a string, got array"),
    ],
)
def test_each_kind_of_malformed_line(tmp_path: Path, line: str, reason: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"instruction": "A", "output": "b"}), line])
    with pytest.raises(DataError, match="line 2: ") as info:
        load_jsonl(path)
    assert info.value.line_errors[0][0] == 2
    assert reason in info.value.line_errors[0][1]


def test_error_list_is_capped_but_count_is_total(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", ["nope"] * 15)
    with pytest.raises(DataError) as info:
        load_jsonl(path, max_errors_listed=3)
    message = str(info.value)
    assert "15 malformed line(s) out of 15" in message
    assert "line 3:" in message and "line 4:" not in message
    assert "... and 12 more" in message
    assert len(info.value.line_errors) == 15


@pytest.mark.parametrize("content", ["", "\n\n", "  \n\t\n \r\n"])
def test_empty_or_blank_file_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="empty") as info:
        load_jsonl(path)
    assert str(path) in str(info.value)
    assert "refuses to train on nothing" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match="no such data file") as info:
        load_jsonl(path)
    assert str(path) in str(info.value)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        load_jsonl(tmp_path)


def test_non_utf8_byte_reported_with_its_line(tmp_path: Path) -> None:
    good = json.dumps({"instruction": "A", "output": "b"}).encode()
    bad = b'{"instruction": "caf\xe9", "output": "b"}'
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join([good, good, bad, good]) + b"\n")
    with pytest.raises(DataError, match=r"line 3: not valid UTF-8 \(byte 0xe9") as info:
        load_jsonl(path)
    assert [n for n, _ in info.value.line_errors] == [3]


def test_unicode_content_is_kept(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "u.jsonl", [json.dumps({"instruction": "Traduis.", "output": "café ☕"})])
    assert load_jsonl(path) == [Example("Traduis.", "", "café ☕")]


def test_data_error_is_a_value_error_naming_its_file(tmp_path: Path) -> None:
    error = DataError(tmp_path / "f.jsonl", "boom", ((1, "bad"),))
    assert isinstance(error, ValueError)
    assert str(error) == f"{tmp_path / 'f.jsonl'}: boom"
    assert error.line_errors == ((1, "bad"),)


def test_negative_max_errors_listed_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_errors_listed"):
        load_jsonl(tmp_path / "x.jsonl", max_errors_listed=-1)
