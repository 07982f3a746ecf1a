"""Local instruction data from JSONL files in the Alpaca, Dolly, Natural-Instructions or prompt/completion styles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge_client.tasks import Example

# Looked up in order, so a record carrying keys of two styles resolves the same way every time.
INSTRUCTION_KEYS: tuple[str, ...] = ("instruction", "definition", "prompt")
INPUT_KEYS: tuple[str, ...] = ("input", "context")
OUTPUT_KEYS: tuple[str, ...] = ("output", "response", "completion")


class DataError(ValueError):
    """A local data set the client refuses to train on; the message names the file and any bad lines."""

    def __init__(self, path: Path, problem: str, line_errors: tuple[tuple[int, str], ...] = ()) -> None:
        self.path = path
        self.problem = problem
        self.line_errors = line_errors
        super().__init__(f"{path}: {problem}")


class _LineError(Exception):
    """Why one line is malformed; never escapes this module."""


def _type_name(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _first_key(record: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((key for key in keys if key in record), None)


def _text(record: dict[str, Any], key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise _LineError(f"{key!r} must be a string, got {_type_name(value)}")
    return value.strip()


def _output_text(record: dict[str, Any], key: str) -> str:
    value = record[key]
    # Natural-Instructions lists several acceptable answers under "output"; one target is enough for training.
    if key == "output" and isinstance(value, list):
        for item in value:
            if not isinstance(item, str):
                raise _LineError(f"{key!r} list items must be strings, got {_type_name(item)}")
        return next((item.strip() for item in value if item.strip()), "")
    if not isinstance(value, str):
        expected = "a string or a list of strings" if key == "output" else "a string"
        raise _LineError(f"{key!r} must be {expected}, got {_type_name(value)}")
    return value.strip()


def _parse_line(text: str) -> Example:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _LineError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _LineError(f"expected a JSON object, got {_type_name(record)}")

    instruction_key = _first_key(record, INSTRUCTION_KEYS)
    if instruction_key is None:
        raise _LineError(f"no instruction field (expected one of {', '.join(INSTRUCTION_KEYS)})")
    output_key = _first_key(record, OUTPUT_KEYS)
    if output_key is None:
        raise _LineError(f"no output field (expected one of {', '.join(OUTPUT_KEYS)})")

    instruction = _text(record, instruction_key)
    if not instruction:
        raise _LineError(f"{instruction_key!r} is empty")
    input_key = _first_key(record, INPUT_KEYS)
    # Alpaca exports often write a missing input as null rather than leaving the key out.
    input_text = "" if input_key is None or record[input_key] is None else _text(record, input_key)
    output = _output_text(record, output_key)
    if not output:
        raise _LineError(f"{output_key!r} is empty")
    return Example(instruction=instruction, input=input_text, output=output)


def load_jsonl(path: Path, *, max_errors_listed: int = 10) -> list[Example]:
    """Every example in a JSONL file; any malformed line, or no examples at all, raises DataError."""
    if max_errors_listed < 0:
        raise ValueError(f"max_errors_listed must be >= 0, got {max_errors_listed}")
    examples: list[Example] = []
    errors: list[tuple[int, str]] = []
    try:
        # Binary mode so a bad byte fails only its own line, and lines split on "\n" alone,
        # matching the line numbers editors and `sed -n` show.
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    # utf-8-sig on the first line drops the byte-order mark some Windows editors write.
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    errors.append((number, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"))
                    continue
                if not text.strip():
                    continue
                try:
                    examples.append(_parse_line(text))
                except _LineError as exc:
                    errors.append((number, str(exc)))
    except FileNotFoundError:
        raise DataError(path, "no such data file") from None
    except OSError as exc:
        raise DataError(path, f"cannot read data file ({exc.strerror or exc})") from None

    if errors:
        total = len(errors) + len(examples)
        listed = [f"  line {number}: {reason}" for number, reason in errors[:max_errors_listed]]
        if len(errors) > max_errors_listed:
            listed.append(f"  ... and {len(errors) - max_errors_listed} more")
        problem = "\n".join([f"{len(errors)} malformed line(s) out of {total} non-blank; fix or remove them:", *listed])
        raise DataError(path, problem, tuple(errors))
    if not examples:
        raise DataError(path, "the dataset is empty (no examples); the client refuses to train on nothing")
    return examples
