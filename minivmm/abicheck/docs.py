"""Regenerate the check table in docs/abi-check.md from the registry (so it cannot drift).
Not a kernel ABI.

    python -m minivmm.abicheck.docs          # rewrite the table in place
    python -m minivmm.abicheck.docs --check  # exit 1 if the file is out of date
"""
from __future__ import annotations

import sys
from pathlib import Path

from .report import markdown_table
from .runner import load_checks, select

BEGIN, END = "<!-- checks:begin -->", "<!-- checks:end -->"
DOC = Path(__file__).resolve().parent.parent.parent / "docs" / "abi-check.md"


def render(text: str) -> str:
    load_checks()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{markdown_table(select())}{END}{tail}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        text = DOC.read_text()
    except OSError as e:        # an installed wheel has no docs/: this is a checkout's tool
        print(f"{DOC}: cannot read it ({e.strerror}): run this in a source checkout of "
              "minivmm", file=sys.stderr)
        return 2
    new = render(text)
    if "--check" in argv:
        if new != text:
            print(f"{DOC} is out of date: run python -m minivmm.abicheck.docs", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
