"""Tests for the built-in procedural instruction tasks and ROUGE-L scoring."""

from __future__ import annotations

import random
import string
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_client.tasks import (
    TASKS,
    WORDS,
    Example,
    make_examples,
    rouge_l,
    task_names,
)

NAMES = task_names()


def test_at_least_22_tasks_with_unique_names_and_instructions() -> None:
    assert len(NAMES) >= 22
    assert len(set(NAMES)) == len(NAMES)
    assert list(TASKS) == NAMES
    instructions = [t.instruction for t in TASKS.values()]
    assert len(set(instructions)) == len(instructions)
    for name, task in TASKS.items():
        assert task.name == name
        assert name.isidentifier() and name == name.lower()
        assert task.instruction.strip()


def test_required_tasks_present() -> None:
    for name in ("uppercase_word", "sort_three_words", "repeat_word", "first_in_list"):
        assert name in TASKS


def test_word_list_is_short_common_lowercase_words() -> None:
    assert 120 <= len(WORDS) <= 200
    assert len(set(WORDS)) == len(WORDS)
    assert all(w.isalpha() and w.islower() and w.isascii() for w in WORDS)


def test_tasks_mapping_is_read_only() -> None:
    with pytest.raises(TypeError):
        TASKS["x"] = TASKS["uppercase_word"]  # type: ignore[index]


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_across_calls(name: str) -> None:
    assert make_examples(name, 20, 7) == make_examples(name, 20, 7)


@pytest.mark.parametrize("name", NAMES)
def test_different_seeds_differ(name: str) -> None:
    assert make_examples(name, 20, 0) != make_examples(name, 20, 1)


@pytest.mark.parametrize("name", NAMES)
def test_examples_vary_within_a_seed(name: str) -> None:
    inputs = {ex.input for ex in make_examples(name, 50, 3)}
    assert len(inputs) >= 10


@pytest.mark.parametrize("name", NAMES)
def test_examples_carry_task_instruction(name: str) -> None:
    exs = make_examples(name, 5, 0)
    assert len(exs) == 5
    assert all(isinstance(ex, Example) for ex in exs)
    assert all(ex.instruction == TASKS[name].instruction for ex in exs)


def test_zero_examples() -> None:
    assert make_examples("uppercase_word", 0, 0) == []


def test_negative_n_raises() -> None:
    with pytest.raises(ValueError):
        make_examples("uppercase_word", -1, 0)


def test_unknown_task_raises_key_error_listing_valid_names() -> None:
    with pytest.raises(KeyError) as info:
        make_examples("no_such_task", 3, 0)
    message = str(info.value)
    assert "no_such_task" in message
    for name in NAMES:
        assert name in message


def _nums(inp: str, sep: str) -> tuple[int, int]:
    a, b = inp.split(sep)
    return int(a), int(b)


# Independent restatements of each rule, written against the input text only.
RULES: dict[str, Callable[[str], str]] = {
    "uppercase_word": lambda s: s.upper(),
    "lowercase_word": lambda s: s.lower(),
    "capitalize_word": lambda s: s.capitalize(),
    "sort_three_words": lambda s: " ".join(sorted(s.split())),
    "repeat_word": lambda s: f"{s} {s}",
    "first_in_list": lambda s: s.split(", ")[0],
    "last_in_list": lambda s: s.split(", ")[-1],
    "reverse_list": lambda s: ", ".join(s.split(", ")[::-1]),
    "reverse_word": lambda s: "".join(reversed(s)),
    "count_words": lambda s: str(len(s.split())),
    "word_length": lambda s: str(len(s)),
    "first_letter": lambda s: s[0],
    "last_letter": lambda s: s[-1],
    "count_vowels": lambda s: str(sum(s.count(v) for v in "aeiou")),
    "spell_word": lambda s: " ".join(list(s)),
    "hyphen_join": lambda s: s.replace(" ", "-"),
    "swap_two_words": lambda s: " ".join(s.split()[::-1]),
    "append_s": lambda s: s + "s",
    "add_numbers": lambda s: str(sum(_nums(s, " and "))),
    "subtract_numbers": lambda s: str(_nums(s, " minus ")[0] - _nums(s, " minus ")[1]),
    "larger_number": lambda s: str(max(_nums(s, " and "))),
    "smaller_number": lambda s: str(min(_nums(s, " and "))),
    "double_number": lambda s: str(int(s) * 2),
    "even_or_odd": lambda s: ("odd", "even")[int(s) % 2 == 0],
    "next_number": lambda s: str(int(s) + 1),
    "next_letter": lambda s: chr(ord(s) + 1),
    "previous_letter": lambda s: chr(ord(s) - 1),
}


def test_every_rule_checked_names_a_real_task() -> None:
    assert set(RULES) <= set(TASKS)
    assert len(RULES) >= 10


@pytest.mark.parametrize("name", sorted(RULES))
def test_outputs_follow_rule(name: str) -> None:
    rule = RULES[name]
    for seed in range(5):
        for ex in make_examples(name, 40, seed):
            assert ex.output == rule(ex.input), (name, ex)


def test_number_tasks_behave() -> None:
    for ex in make_examples("subtract_numbers", 100, 0):
        assert int(ex.output) >= 0
    for ex in make_examples("larger_number", 100, 0):
        a, b = _nums(ex.input, " and ")
        assert a != b
    letters = {ex.input for ex in make_examples("next_letter", 200, 0)}
    assert letters <= set(string.ascii_lowercase[:-1])
    letters = {ex.input for ex in make_examples("previous_letter", 200, 0)}
    assert letters <= set(string.ascii_lowercase[1:])


def test_sort_uses_distinct_words_in_some_unsorted_order() -> None:
    exs = make_examples("sort_three_words", 50, 0)
    assert all(len(set(ex.input.split())) == 3 for ex in exs)
    assert any(ex.input != ex.output for ex in exs)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(NAMES), seed=st.integers(-(2**40), 2**40))
def test_length_bounds(name: str, seed: int) -> None:
    for ex in make_examples(name, 8, seed):
        assert 0 < len(ex.input) < 60
        assert 0 < len(ex.output) < 40
        assert ex.output == ex.output.strip()
        assert "\n" not in ex.input + ex.output


@settings(max_examples=50, deadline=None)
@given(name=st.sampled_from(NAMES), seed=st.integers(0, 10**6), n=st.integers(1, 30))
def test_prefix_stable(name: str, seed: int, n: int) -> None:
    assert make_examples(name, n, seed) == make_examples(name, n + 5, seed)[:n]


def test_seeding_does_not_touch_global_random() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    make_examples("uppercase_word", 10, 0)
    assert random.random() == expected


def test_rouge_identical_is_one() -> None:
    assert rouge_l(["the cat sat", "dog"], ["the cat sat", "dog"]) == pytest.approx(1.0)


def test_rouge_disjoint_is_zero() -> None:
    assert rouge_l(["red fish"], ["blue cow"]) == 0.0


def test_rouge_partial_and_mean() -> None:
    # LCS 2 of 3 tokens each side: P = R = F = 2/3; averaged with a perfect 1.0.
    score = rouge_l(["a b c", "x"], ["a b d", "x"])
    assert score == pytest.approx((2 / 3 + 1.0) / 2)


def test_rouge_is_case_insensitive_without_stemming() -> None:
    assert rouge_l(["CAT"], ["cat"]) == pytest.approx(1.0)
    assert rouge_l(["cats"], ["cat"]) == 0.0


def test_rouge_empty_is_zero() -> None:
    assert rouge_l([], []) == 0.0


def test_rouge_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        rouge_l(["a"], ["a", "b"])


@settings(max_examples=50, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=6))
def test_rouge_self_score_and_range(words: list[str]) -> None:
    text = " ".join(words)
    assert rouge_l([text], [text]) == pytest.approx(1.0)
    other = rouge_l([text], ["zebra quiz"])
    assert 0.0 <= other <= 1.0
