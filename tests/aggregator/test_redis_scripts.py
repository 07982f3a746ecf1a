"""The round store's Lua scripts name their keys and arguments once, on their first lines, so no line of a
script's logic depends on a bare position (which a change in the caller's order would silently shift)."""

from __future__ import annotations

import re

import pytest

from aggregator.stores import redis_scripts

SCRIPTS = {name: value for name, value in vars(redis_scripts).items() if name.isupper() and isinstance(value, str)}
BARE = re.compile(r"\b(KEYS|ARGV)\[\d+\]")


def test_the_store_has_its_scripts() -> None:
    assert {"RECORD", "COMMIT", "ACQUIRE", "RELEASE", "OPEN_TRANSFER", "EXPIRE_TRANSFER", "DROP_UPDATE"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_keys_and_arguments_are_named_before_the_logic(name: str) -> None:
    lines = [line.strip() for line in SCRIPTS[name].strip().splitlines()]
    naming = 0
    while naming < len(lines) and lines[naming].startswith("local "):
        naming += 1
    assert naming >= 1, f"{name} names no KEYS or ARGV on its first lines"
    bare = [line for line in lines[naming:] if BARE.search(line)]
    assert not bare, f"{name} uses bare positions after its naming lines: {bare}"
