"""Passkey retrieval prompts, generated in-process from a seed, and their scoring.

A trial hides a random 5-digit key in a haystack of real text and asks for it back:

    <haystack, first part> The pass key is 12345. Remember it. 12345 is the pass key. <haystack, rest>
    What is the pass key? The pass key is

Rules (every one of them exact, so a trial is the same token sequence on every run):
- **Haystack**: the evaluation long passages (`evaluation_passages`), joined by a blank line in an order rotated by
  the trial's random generator, and read from a random token offset; the text is tokenised once without special
  tokens and cut on token boundaries (a cut may fall inside a word). Never a repeated filler sentence.
- **Length**: the prompt is a token sequence of exactly L ids (±0): the tokenizer's own leading special tokens (a
  BOS, where it adds one), the haystack, the needle and the question, each tokenised separately without special
  tokens and concatenated as ids (never re-tokenised as one string). The haystack gets the L − (special + needle +
  question) tokens that remain; a length that leaves none is refused.
- **Depth** d ∈ (0, 1): the needle follows the first round(d · H) of the H haystack tokens.
- **Determinism**: the key, the passage order and the offset come from `random.Random(f"{seed}/{trial}/{L}/{d}")`
  (a string seed is hashed by SHA-512: the same on every platform and Python run).
- **Score**: the greedy continuation is decoded to text and leading whitespace stripped; the trial is correct iff its
  first 5 characters are the key's 5 digits. Output that starts with anything else (a word, a shorter number, a
  digit run that differs) scores 0: there is no partial credit.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from sink_eval.core.errors import SinkEvalError
from sink_eval.prompts.prompt_set import Prompt, long_passages

KEY_DIGITS = 5
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
PASSAGE_SEPARATOR = "\n\n"
NEW_TOKENS = 8  # greedy tokens generated per trial: room for " 12345" on tokenizers that split every digit


def evaluation_passages() -> list[Prompt]:
    """The long passages that policies are judged on: the evaluation half of `prompts.long_passages` (its rule: in
    file order the first two prose and first two code passages calibrate, the other four evaluate)."""
    return long_passages("evaluation")


@dataclass(frozen=True)
class PasskeyTrial:
    key: str  # 5 digits
    length: int  # L
    depth: float  # d
    input_ids: list[int]  # exactly `length` ids
    needle_start: int  # index of the needle's first token in input_ids
    needle_tokens: int


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def leading_special(tokenizer) -> list[int]:
    """The special ids the tokenizer puts before a text by default (a BOS, or nothing)."""
    with_special = list(tokenizer("a")["input_ids"])
    plain = _ids(tokenizer, "a")
    return with_special[: len(with_special) - len(plain)] if with_special[-len(plain) :] == plain else []


@functools.cache
def _haystack_ids(tokenizer, order: tuple[int, ...]) -> tuple[int, ...]:
    passages = evaluation_passages()
    return tuple(_ids(tokenizer, PASSAGE_SEPARATOR.join(passages[i].text for i in order)))


def min_length(tokenizer) -> int:
    """The shortest L that leaves a haystack token beside the needle and question (the needle of key 99999)."""
    needle = _ids(tokenizer, NEEDLE.format(key="9" * KEY_DIGITS))
    return len(leading_special(tokenizer)) + len(needle) + len(_ids(tokenizer, QUESTION)) + 1


def make_trial(tokenizer, seed: int, trial: int, length: int, depth: float) -> PasskeyTrial:
    """Trial `trial` of the (seed, L, d) cell: see the module doc for every rule."""
    if not 0 < depth < 1:
        raise SinkEvalError(f"a needle depth is in (0, 1), not {depth}")
    rng = random.Random(f"{seed}/{trial}/{length}/{depth}")
    key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))
    n_passages = len(evaluation_passages())
    start = rng.randrange(n_passages)
    order = tuple((start + i) % n_passages for i in range(n_passages))
    special = leading_special(tokenizer)
    needle = _ids(tokenizer, NEEDLE.format(key=key))
    question = _ids(tokenizer, QUESTION)
    n_hay = length - len(special) - len(needle) - len(question)
    if n_hay < 1:
        raise SinkEvalError(
            f"a passkey prompt of {length} tokens leaves no haystack beside the needle and question; use at least "
            f"{min_length(tokenizer)} tokens"
        )
    haystack = _haystack_ids(tokenizer, order)
    if n_hay > len(haystack):
        raise SinkEvalError(
            f"a passkey prompt of {length} tokens needs {n_hay} haystack tokens; the evaluation passages have "
            f"{len(haystack)} with this tokenizer"
        )
    offset = rng.randrange(len(haystack) - n_hay + 1)
    hay = list(haystack[offset : offset + n_hay])
    before = round(depth * n_hay)
    ids = special + hay[:before] + needle + hay[before:] + question
    return PasskeyTrial(key, length, depth, ids, len(special) + before, len(needle))


def is_correct(key: str, continuation: str) -> bool:
    """The scoring rule (module doc): the stripped continuation's first 5 characters are the key."""
    return continuation.lstrip()[:KEY_DIGITS] == key
