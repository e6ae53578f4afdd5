"""Writes the table of HF peft's public names (``peft.__all__``) and whether graftkit has each into
docs/coming-from-peft.md, between the two marker lines. ``tests/test_docs.py`` checks the page holds what this
would write, so the table cannot go stale.

    python scripts/peft_names.py          # rewrite the table in place
"""

from __future__ import annotations

import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parent.parent / "docs" / "coming-from-peft.md"
BEGIN = "<!-- peft-names: begin (written by scripts/peft_names.py) -->"
END = "<!-- peft-names: end -->"


def table() -> str:
    """The markdown table: every name in ``peft.__all__``, and whether ``graftkit`` exports it."""
    import peft

    import graftkit

    ours = set(graftkit.__all__) | {"SFTTrainer"}  # SFTTrainer is exported lazily (it needs TRL)
    names = sorted(set(peft.__all__), key=str.lower)
    have = [n for n in names if n in ours]
    rows = [f"HF peft {peft.__version__} exports {len(names)} names; graftkit has {len(have)} of them.", "",
            "| HF peft name | in graftkit |", "|---|---|"]
    rows += [f"| `{n}` | {'yes' if n in ours else 'not yet'} |" for n in names]
    return "\n".join(rows)


def section(text: str) -> str:
    """The part of ``text`` between the markers."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n")


def main() -> int:
    text = PAGE.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    PAGE.write_text(text[:start] + "\n" + table() + "\n" + text[end:], encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
