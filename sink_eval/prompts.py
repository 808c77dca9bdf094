"""Prompt sets from real text, length bins and tokenisation.

A prompt file is JSONL: one object per line with `text` (required), `id` and `domain` (optional). The default set is
cut from real text only, never from text written for this project: Python standard-library source (code), WikiText-2
and LAMBADA (prose), ARC-Easy, PIQA and HellaSwag (qa), and the first one to three words of real sentences (short).
Prompts are tokenised exactly as the model's tokenizer does by default (its own special tokens, no chat template).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from sink_eval.errors import SinkEvalError

DATA_ENV = "SINK_EVAL_DATA"
LENGTH_BINS: tuple[tuple[int, int], ...] = ((1, 3), (4, 9), (10, 19), (20, 49), (50, 199), (200, 999), (1000, 4096))
DEFAULT_MAX_TOKENS = 4096

# Target length in characters of the default prompts of each bin above, and how many to cut per domain.
_BIN_CHARS = (None, 22, 55, 130, 420, 1900, 6500)
_PER_DOMAIN = (None, 4, 4, 4, 4, 2, 1)
_STDLIB_MODULES = ("textwrap.py", "heapq.py", "bisect.py", "fractions.py", "statistics.py", "shlex.py", "difflib.py")


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
    """Read a JSONL prompt file; a malformed line is an error that names its line number."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise SinkEvalError(f"cannot read prompt file {path}: {err.strerror}") from err
    prompts, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SinkEvalError(f"{where}: not valid JSON ({err.msg}); each line must be one JSON object") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SinkEvalError(f'{where}: each line needs a string field "text", e.g. {{"text": "Once upon"}}')
        if not record["text"].strip():
            raise SinkEvalError(f"{where}: the prompt text is empty; remove the line or give it text")
        prompt_id = str(record.get("id", f"{path.stem}-{number}"))
        if prompt_id in seen:
            raise SinkEvalError(f"{where}: duplicate id {prompt_id!r}; ids must be unique")
        seen.add(prompt_id)
        prompts.append(Prompt(id=prompt_id, domain=str(record.get("domain", "unspecified")), text=record["text"]))
    if not prompts:
        raise SinkEvalError(f'prompt file {path} has no prompts: write one JSON object per line with a "text"')
    return prompts


def find_data_dir(explicit: str | Path | None = None) -> Path:
    """The eval-data folder: `explicit` (--data-dir), else $SINK_EVAL_DATA, else ../shared/evals-data beside
    the working directory or this checkout."""
    candidates = [Path(explicit)] if explicit else []
    if not candidates and os.environ.get(DATA_ENV):
        candidates = [Path(os.environ[DATA_ENV])]
    if not candidates:
        here = Path(__file__).resolve().parents[1]
        candidates = [Path.cwd().parent / "shared" / "evals-data", here.parent / "shared" / "evals-data"]
    for candidate in candidates:
        if (candidate / "wikitext2" / "wiki.test.raw").is_file():
            return candidate
    raise SinkEvalError(
        f"no eval data found (looked in: {', '.join(str(c) for c in candidates)}). The default prompt set needs "
        "wikitext2/wiki.test.raw, lambada_openai/lambada_test.jsonl, arc_easy/ARC-Easy-Dev.jsonl, "
        "piqa/valid.jsonl and hellaswag/hellaswag_val.jsonl: pass --data-dir or set "
        f"{DATA_ENV} to the folder that holds them, or give your own --prompts FILE.jsonl."
    )


def _require(path: Path) -> Path:
    if not path.is_file():
        raise SinkEvalError(f"missing eval data file {path}; see `find_data_dir` for the files the default set needs")
    return path


def _jsonl(path: Path, limit: int) -> list[dict]:
    with open(_require(path), encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(limit), f, strict=False)]


def _source_documents(data: Path) -> dict[str, list[str]]:
    """Real documents per domain, in a fixed order."""
    wiki = _require(data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    paragraphs = [line.strip() for line in wiki.split("\n") if line.strip() and not line.strip().startswith("=")]
    lambada = [r["text"] for r in _jsonl(data / "lambada_openai" / "lambada_test.jsonl", 40)]
    arc = [
        r["question"]["stem"] + " " + " ".join(c["text"] for c in r["question"]["choices"])
        for r in _jsonl(data / "arc_easy" / "ARC-Easy-Dev.jsonl", 60)
    ]
    piqa = [r["goal"] + " " + r["sol1"] for r in _jsonl(data / "piqa" / "valid.jsonl", 60)]
    hellaswag = [r["ctx"] for r in _jsonl(data / "hellaswag" / "hellaswag_val.jsonl", 60)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [(stdlib / name).read_text(encoding="utf-8") for name in _STDLIB_MODULES]
    return {
        "code": code,
        "prose": [p for pair in zip(paragraphs[::7], lambada, strict=False) for p in pair],
        "qa": [q for triple in zip(arc, piqa, hellaswag, strict=False) for q in triple],
    }


def _cut(documents: list[str], start: int, chars: int, boundary: str) -> str:
    """The first `chars` characters (at most) of the documents from `start` on, joined by blank lines, cut at the
    last `boundary` (a space or a newline) so that no word or line is split."""
    text, i = "", start
    while len(text) < chars:
        text += ("\n\n" if text else "") + documents[i % len(documents)]
        i += 1
    cut = text[:chars]
    return cut[: cut.rfind(boundary)] if boundary in cut else cut


def default_prompts(data_dir: str | Path | None = None) -> list[Prompt]:
    """The default prompt set: code, prose and qa cut to the length bins, and 1-3-word sentence openings."""
    documents = _source_documents(find_data_dir(data_dir))
    prompts = []
    for domain, docs in documents.items():
        boundary = "\n" if domain == "code" else " "
        for (lo, hi), chars, count in zip(LENGTH_BINS, _BIN_CHARS, _PER_DOMAIN, strict=True):
            for k in range(count or 0):
                start = k * 3 if domain != "code" else k
                text = _cut(docs, start, chars, boundary)
                prompts.append(Prompt(id=f"{domain}-{lo}-{hi}-{k}", domain=domain, text=text))
    openings = documents["prose"][:4]
    for words in (1, 2, 3):
        for k, sentence in enumerate(openings):
            prompts.append(Prompt(id=f"short-{words}w-{k}", domain="short", text=" ".join(sentence.split()[:words])))
    return prompts


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
