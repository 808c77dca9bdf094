"""Whether two long-context grids (`sink-eval longctx` results.json) agree on fidelity to the last digit.

    python scripts/compare_longctx_fidelity.py OLD/results.json NEW/results.json

For every run label the two share, at every length: the passages' mean token NLL (`passage_nll`) and every passkey
trial's greedy answer must be equal, not close. Prints one line per (run, length) and exits 1 on any difference: a
change that leaves every output unchanged (a faster kernel for the same attention) must show none.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(old_path: str, new_path: str) -> int:
    old, new = ({run["label"]: run for run in json.loads(Path(p).read_text())["runs"]} for p in (old_path, new_path))
    differ = 0
    for label in sorted(set(old) & set(new)):
        for before, after in zip(old[label]["lengths"], new[label]["lengths"], strict=True):
            same_nll = before["passage_nll"] == after["passage_nll"]
            answers = [[cell.get("answers") for cell in run["passkey"]] for run in (before, after)]
            same_answers = answers[0] == answers[1]
            differ += not (same_nll and same_answers)
            print(
                f"{label} {after['length']}: NLL {'equal' if same_nll else 'DIFFERENT'}, "
                f"passkey answers {'equal' if same_answers else 'DIFFERENT'}"
            )
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
