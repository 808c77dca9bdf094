"""pip for tox's gpu environment (its `install_command`): torch from the machine, never a CUDA wheel pulled by the
project's `torch>=2.4`.

- A torch the environment can already import (the machine's, through `system_site_packages`: a CUDA machine's own
  CUDA build) is kept, and every install is held to exactly that version.
- Where there is none, torch is installed first, pinned as in constraints.txt (2.13.0: on this project's CPU machines
  pip finds that CPU build on local disk). `$SINK_EVAL_TORCH_INDEX` names another index for it, e.g. PyTorch's CPU
  wheels on a machine that has no local build (`https://download.pytorch.org/whl/cpu`).

Then pip runs as tox asked, under constraints.txt with its torch line replaced by the version found.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
INDEX_ENV = "SINK_EVAL_TORCH_INDEX"


def torch_version() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def pinned_torch() -> str:
    """The torch requirement constraints.txt pins (torch==X)."""
    for line in CONSTRAINTS.read_text().splitlines():
        if line.split("==")[0].strip().lower() == "torch":
            return line.strip()
    raise SystemExit(f"{CONSTRAINTS} pins no torch")


def pip(*args: str, constraints: Path | None = None) -> None:
    env = dict(os.environ)
    env.pop("PIP_CONSTRAINT", None)
    if constraints is not None:
        env["PIP_CONSTRAINT"] = str(constraints)
    subprocess.run([sys.executable, "-m", "pip", "install", *args], check=True, env=env)


def main(argv: list[str]) -> int:
    found = torch_version()
    if found is None:
        index = os.environ.get(INDEX_ENV)
        print(f"gpu_pip: no torch here; installing {pinned_torch()}{f' from {index}' if index else ''}", flush=True)
        pip(pinned_torch(), *(["--index-url", index] if index else []))
        found = torch_version()
        assert found is not None, "pip installed torch"
    else:
        print(f"gpu_pip: using the torch this environment sees: {found}", flush=True)
    lines = [line for line in CONSTRAINTS.read_text().splitlines() if line.split("==")[0].strip().lower() != "torch"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="gpu-constraints-", delete=False) as fh:
        fh.write("\n".join([*lines, f"torch=={found}", ""]))
    try:
        if argv:
            pip(*argv, constraints=Path(fh.name))
    finally:
        os.unlink(fh.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
