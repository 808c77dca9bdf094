"""Prompt sets from real text, length bins and tokenisation.

A prompt file is JSONL: one object per line with `text` (required), `id` and `domain` (optional). The default set,
`sink_eval/prompts/data/prompts.jsonl`, is committed: cut from real text only, never from text written for this project,
by `scripts/build_prompt_set.py` (sources, licences, source-file SHA-256s and the selection rule are in
`sink_eval/prompts/data/prompts.provenance.json`): CPython 3.11.7 standard-library source (code), WikiText-2 and LAMBADA
(prose), ARC-Easy, PIQA, HellaSwag, TriviaQA, NQ-open and BoolQ (qa), allenai's basic_arithmetic (arithmetic), and
the first one to three words of real sentences (short). Each record carries its split: calibration, evaluation, or
long (passages of 4 096+ tokens for long-context work).
Prompts are tokenised exactly as the model's tokenizer does by default (its own special tokens, no chat template).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sink_eval.core.errors import SinkEvalError

LENGTH_BINS: tuple[tuple[int, int], ...] = ((1, 3), (4, 9), (10, 19), (20, 49), (50, 199), (200, 999), (1000, 4096))
DEFAULT_MAX_TOKENS = 4096
LONG_TOKENS = 2048  # the long passages are cut to this many tokens by default (patch-eval, longctx calibration)

PROMPT_FILE = "prompts.jsonl"


@dataclass(frozen=True)
class Prompt:
    id: str
    domain: str
    text: str


@dataclass(frozen=True)
class TokenizedPrompt:
    prompt: Prompt
    input_ids: list[int]
    truncated_from: int | None = None  # the prompt's length in tokens before `tokenize(truncate=True)` cut it


def length_bin(n_tokens: int, bins: tuple[tuple[int, int], ...] = LENGTH_BINS) -> tuple[int, int] | None:
    return next((b for b in bins if b[0] <= n_tokens <= b[1]), None)


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Read a JSONL prompt file; a malformed line (bytes that are not UTF-8 included) is an error that names its line
    number."""
    path = Path(path)
    lines = _utf8_text(path).splitlines()
    prompts, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err) or type(err).__name__
            raise SinkEvalError(f"{where}: not valid JSON ({reason}); each line must be one JSON object") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SinkEvalError(f'{where}: each line needs a string field "text", e.g. {{"text": "Once upon"}}')
        if not record["text"].strip():
            raise SinkEvalError(f"{where}: the prompt text is empty; remove the line or give it text")
        prompt_id = _text_field(record, "id", f"{path.stem}-{number}", where, numbers=True)
        if prompt_id in seen:
            raise SinkEvalError(f"{where}: duplicate id {prompt_id!r}; ids must be unique")
        seen.add(prompt_id)
        domain = _text_field(record, "domain", "unspecified", where)
        prompts.append(Prompt(id=prompt_id, domain=domain, text=_text_field(record, "text", "", where)))
    if not prompts:
        raise SinkEvalError(f'prompt file {path} has no prompts: write one JSON object per line with a "text"')
    return prompts


def _text_field(record: dict, name: str, default: str, where: str, numbers: bool = False) -> str:
    """A prompt record's field `name` as text (`default` where absent). Rules: a string (a whole number too where
    `numbers`: an id may be 7), made only of characters (no lone surrogate such as "\\ud800", which no tokenizer
    or UTF-8 file can hold)."""
    value = record.get(name, default)
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        kind = "a string or a whole number" if numbers else "a string"
        raise SinkEvalError(f'{where}: "{name}" must be {kind}, not {json.dumps(value)[:40]}; fix it or leave it out')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SinkEvalError(
            f'{where}: "{name}" holds a lone surrogate ({value[err.start]!r} at character {err.start}), which is not '
            "a character; fix the \\u escape"
        ) from err
    return value


@functools.cache
def _committed_set() -> tuple[tuple[str, Prompt], ...]:
    """(split, prompt) of every record of the committed prompt file, read once per process."""
    with resources.files("sink_eval.prompts").joinpath("data", PROMPT_FILE).open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return tuple((r["split"], Prompt(id=r["id"], domain=r["domain"], text=r["text"])) for r in rows)


def _records(split: str) -> list[Prompt]:
    return [prompt for name, prompt in _committed_set() if name == split]


def _utf8_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming their line and byte offset."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SinkEvalError(f"cannot read prompt file {path}: {err.strerror}") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SinkEvalError(
            f"{path}, line {line} (byte offset {err.start}): not UTF-8 ({err.reason}); save the file as UTF-8"
        ) from err


def default_split() -> tuple[list[Prompt], list[Prompt]]:
    """The default set's fixed (calibration, evaluation) halves, as frozen in the file."""
    return _records("calibration"), _records("evaluation")


def default_prompts() -> list[Prompt]:
    """The default prompt set: calibration then evaluation prompts (code, prose, qa and arithmetic cut to the length
    bins, and 1-3-word sentence openings)."""
    calibration, evaluation = default_split()
    return calibration + evaluation


LONG_SPLITS = ("calibration", "evaluation")
LONG_CALIBRATION_PER_DOMAIN = 2


def long_passages(split: str | None = None) -> list[Prompt]:
    """The long split: 4 prose passages and 4 code files of 4 096+ tokens (not part of the default set), in file
    order. Rule for `split`: the first two prose and the first two code passages are "calibration", the other four
    "evaluation" (None: all eight)."""
    passages = _records("long")
    if split is None:
        return passages
    if split not in LONG_SPLITS:
        raise SinkEvalError(f"the long passages split into {' or '.join(LONG_SPLITS)}, not {split!r}")
    calibration = {
        p.id
        for domain in sorted({p.domain for p in passages})
        for p in [q for q in passages if q.domain == domain][:LONG_CALIBRATION_PER_DOMAIN]
    }
    return [p for p in passages if (p.id in calibration) == (split == "calibration")]


def prompt_set_sha256(prompts: list[Prompt]) -> str:
    """Identifies a prompt set by its ids, domains and texts, in order."""
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.id, p.domain, p.text]).encode())
    return digest.hexdigest()


def tokenize(
    tokenizer, prompts: list[Prompt], max_tokens: int = DEFAULT_MAX_TOKENS, truncate: bool = False
) -> list[TokenizedPrompt]:
    """Token ids of each prompt with the tokenizer's default special tokens. A prompt longer than `max_tokens`
    (or the model's context) is an error unless `truncate`, which keeps its first `max_tokens` tokens (and records
    the original length in `truncated_from`)."""
    out = []
    for prompt in prompts:
        if not prompt.text.strip():
            raise SinkEvalError(f"prompt {prompt.id!r} is empty; every prompt needs text")
        ids = tokenizer(prompt.text)["input_ids"]
        truncated_from = None
        if len(ids) > max_tokens:
            if not truncate:
                raise SinkEvalError(
                    f"prompt {prompt.id!r} has {len(ids)} tokens, more than --max-tokens {max_tokens}; "
                    "shorten it, raise --max-tokens (up to the model's context), or pass --truncate"
                )
            ids, truncated_from = ids[:max_tokens], len(ids)
        out.append(TokenizedPrompt(prompt=prompt, input_ids=ids, truncated_from=truncated_from))
    return out


def model_context(model) -> int | None:
    """The longest sequence the model's position embeddings cover (None if its config does not say)."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def check_max_tokens(max_tokens: int, model, name: str) -> None:
    """Rule for every command that tokenizes prompts: --max-tokens must fit the model's context."""
    context = model_context(model)
    if context is not None and max_tokens > context:
        raise SinkEvalError(
            f"--max-tokens {max_tokens} exceeds {name}'s context of {context} tokens; pass --max-tokens {context} "
            "or less (with --truncate to cut longer prompts)"
        )


def check_new_tokens(new_tokens: int, continued: list[TokenizedPrompt], model, name: str) -> None:
    """Rule for a command that continues prompts: the longest prompt continued plus --new-tokens fits the model's
    context."""
    context = model_context(model)
    longest = max((len(p.input_ids) for p in continued), default=0)
    if context is None or longest + new_tokens <= context:
        return
    fix = (
        f"pass --new-tokens {context - longest} or less"
        if longest < context
        else "give shorter prompts (--max-tokens, --long-tokens)"
    )
    raise SinkEvalError(
        f"--new-tokens {new_tokens}: a continued prompt of {longest} tokens would run to {longest + new_tokens}, past "
        f"{name}'s context of {context} tokens; {fix}"
    )
