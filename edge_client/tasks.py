"""Procedural instruction tasks small enough for a tiny LM to learn in a few LoRA steps, plus ROUGE-L scoring."""

from __future__ import annotations

import functools
import random
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    make: Callable[[random.Random], tuple[str, str]]


# Short, all-lowercase, purely alphabetic words (3-6 letters) keep every
# input under 60 characters and every output under 40, and make letter-level
# rules unambiguous.
_WORD_TEXT = """
    apple arm baby bag ball band bank bed bell bird boat book box boy bread brick
    cake calm camp car card cat chair clock cloud coat cow cup dark desk dog door
    dream duck ear egg eye farm fish flag floor fog food foot fox frog game gate
    gift girl glass goat gold grass green hand hat hill home horse house ice ink
    jam jar key king kite lake lamp leaf leg light lion lock map milk moon mouse
    music nest net night nose oak ocean owl paint paper park pen pig pink plant
    plate pond queen rain red ring river road rock roof room rope salt sand ship
    shoe shop sky snow sock song spoon star stone sun table tent tiger toy train
    tree truck van wall water whale wind wing wolf wood yard year zebra zoo bus
    corn drum fan hawk iron jet lime mint nut pear quiz
"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())

_LETTERS = string.ascii_lowercase
_VOWELS = frozenset("aeiou")


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _distinct_words(rng: random.Random, k: int) -> list[str]:
    # Distinct words so sort and list-position answers never hinge on ties.
    return rng.sample(WORDS, k)


def _uppercase(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w.upper()


def _lowercase(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w.upper(), w


def _capitalize(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w[0].upper() + w[1:]


def _sort_three(rng: random.Random) -> tuple[str, str]:
    ws = _distinct_words(rng, 3)
    return " ".join(ws), " ".join(sorted(ws))


def _repeat(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, f"{w} {w}"


def _first_in_list(rng: random.Random) -> tuple[str, str]:
    ws = _distinct_words(rng, rng.randint(3, 5))
    return ", ".join(ws), ws[0]


def _last_in_list(rng: random.Random) -> tuple[str, str]:
    ws = _distinct_words(rng, rng.randint(3, 5))
    return ", ".join(ws), ws[-1]


def _reverse_list(rng: random.Random) -> tuple[str, str]:
    ws = _distinct_words(rng, 3)
    return ", ".join(ws), ", ".join(reversed(ws))


def _reverse_word(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w[::-1]


def _count_words(rng: random.Random) -> tuple[str, str]:
    # At most 7 six-letter words keeps the input under 60 characters.
    ws = [_word(rng) for _ in range(rng.randint(2, 7))]
    return " ".join(ws), str(len(ws))


def _word_length(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, str(len(w))


def _first_letter(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w[0]


def _last_letter(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w[-1]


def _count_vowels(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, str(sum(c in _VOWELS for c in w))


def _spell(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, " ".join(w)


def _hyphen_join(rng: random.Random) -> tuple[str, str]:
    ws = [_word(rng) for _ in range(rng.randint(2, 4))]
    return " ".join(ws), "-".join(ws)


def _swap_two(rng: random.Random) -> tuple[str, str]:
    a, b = _distinct_words(rng, 2)
    return f"{a} {b}", f"{b} {a}"


def _append_s(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w + "s"


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return f"{a} and {b}", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    # Larger number first so the answer is never negative.
    a, b = sorted((rng.randint(0, 30), rng.randint(0, 30)), reverse=True)
    return f"{a} minus {b}", str(a - b)


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(100), 2)
    return f"{a} and {b}", str(max(a, b))


def _smaller(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(100), 2)
    return f"{a} and {b}", str(min(a, b))


def _double(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 50)
    return str(n), str(2 * n)


def _even_odd(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 99)
    return str(n), "even" if n % 2 == 0 else "odd"


def _next_number(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 98)
    return str(n), str(n + 1)


def _next_letter(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(len(_LETTERS) - 1)
    return _LETTERS[i], _LETTERS[i + 1]


def _previous_letter(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(1, len(_LETTERS))
    return _LETTERS[i], _LETTERS[i - 1]


_TASK_LIST: tuple[Task, ...] = (
    Task("uppercase_word", "Write the word in capital letters.", _uppercase),
    Task("sort_three_words", "Sort the three words alphabetically.", _sort_three),
    Task("repeat_word", "Repeat the word twice, separated by a space.", _repeat),
    Task("first_in_list", "Name the first word of the list.", _first_in_list),
    Task("last_in_list", "Name the last word of the list.", _last_in_list),
    Task("reverse_list", "Write the words of the list in reverse order.", _reverse_list),
    Task("reverse_word", "Write the letters of the word in reverse order.", _reverse_word),
    Task("count_words", "How many words are there? Answer with a number.", _count_words),
    Task("word_length", "How many letters does the word have?", _word_length),
    Task("first_letter", "What is the first letter of the word?", _first_letter),
    Task("last_letter", "What is the last letter of the word?", _last_letter),
    Task("count_vowels", "Count the vowels (a, e, i, o, u) in the word.", _count_vowels),
    Task("spell_word", "Spell the word with a space between each letter.", _spell),
    Task("capitalize_word", "Capitalize the first letter of the word.", _capitalize),
    Task("lowercase_word", "Write the shouted word in small letters.", _lowercase),
    Task("hyphen_join", "Join the words with hyphens.", _hyphen_join),
    Task("swap_two_words", "Swap the order of the two words.", _swap_two),
    Task("append_s", "Add the letter s to the end of the word.", _append_s),
    Task("add_numbers", "Add the two numbers.", _add),
    Task("subtract_numbers", "Subtract the second number from the first.", _subtract),
    Task("larger_number", "Which of the two numbers is larger?", _larger),
    Task("smaller_number", "Which of the two numbers is smaller?", _smaller),
    Task("double_number", "Multiply the number by two.", _double),
    Task("even_or_odd", "Is the number even or odd?", _even_odd),
    Task("next_number", "Write the number that comes right after this one.", _next_number),
    Task("next_letter", "Write the letter that comes after this one in the alphabet.", _next_letter),
    Task(
        "previous_letter",
        "Write the letter that comes before this one in the alphabet.",
        _previous_letter,
    ),
)

TASKS: Mapping[str, Task] = MappingProxyType({t.name: t for t in _TASK_LIST})


def task_names() -> list[str]:
    return list(TASKS)


def make_examples(task: str, n: int, seed: int) -> list[Example]:
    """n examples of one task, deterministic for (task, n, seed)."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    spec = TASKS[task]
    # String seeds go through SHA-512 in random.Random, so they are stable
    # across processes, unlike hash(), which is salted per interpreter.
    rng = random.Random(f"{task}:{seed}")
    examples = []
    for _ in range(n):
        inp, out = spec.make(rng)
        examples.append(Example(instruction=spec.instruction, input=inp, output=out))
    return examples


class _Score(Protocol):
    fmeasure: float


class _Scorer(Protocol):
    def score(self, target: str, prediction: str) -> Mapping[str, _Score]: ...


@functools.cache
def _scorer() -> _Scorer:
    # Imported lazily: rouge_score pulls in nltk, which callers that only
    # generate data should not pay for.
    from rouge_score import rouge_scorer

    scorer: _Scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return scorer


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure over (prediction, reference) pairs; 0.0 for empty input."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    scorer = _scorer()
    total = 0.0
    for pred, ref in zip(predictions, references, strict=True):
        total += float(scorer.score(ref, pred)["rougeL"].fmeasure)
    return total / len(predictions)
