"""`python -m model.cli` with every file write recorded, to check which torchrun rank writes what.

Run as a torchrun script: `torchrun ... tests/scale/audited_cli.py train ...`. Writes (open for
write, mkdir, rename, replace) under the `--out` directory are appended to
$POLARITY_AUDIT_DIR/writes-rank<RANK>.txt, one path per line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def _install(audit_dir: Path, watched: Path) -> None:
    log = audit_dir / f"writes-rank{os.environ.get('RANK', '0')}.txt"
    log.touch()
    root = str(watched.resolve())

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and isinstance(args[0], (str, os.PathLike)):
            mode = args[1] or "r"
            flags = args[2] if len(args) > 2 else 0
            writing = any(c in str(mode) for c in "wax+") or bool(flags & (os.O_WRONLY | os.O_RDWR))
            paths = [args[0]] if writing else []
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove"):
            paths = [a for a in args[:2] if isinstance(a, (str, os.PathLike))]
        else:
            return
        for p in paths:
            full = os.path.abspath(os.fspath(p))
            if full.startswith(root):
                with open(log, "a") as f:  # nested open is not under `root`, so no recursion
                    f.write(full + "\n")

    sys.addaudithook(hook)


if __name__ == "__main__":
    argv = sys.argv[1:]
    _install(Path(os.environ["POLARITY_AUDIT_DIR"]), Path(argv[argv.index("--out") + 1]))
    from model.cli import main

    sys.exit(main(argv))
