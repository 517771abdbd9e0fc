"""Generate the README's variants table from the registry: ``python -m lorakit.bench.docs [README.md]``.

The table sits between two marker lines; a test checks the committed README matches the registry.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lorakit.variants import VARIANTS

BEGIN = "<!-- variants-table:begin -->"
END = "<!-- variants-table:end -->"


def variants_table() -> str:
    lines = [
        "| name | class | paper | what it does | layer kinds | training rules |",
        "|---|---|---|---|---|---|",
    ]
    for name, cls in VARIANTS.items():
        kinds = ", ".join(cls.kinds.names())
        # A hook's rules run during training, stages before it (a Stages object, named by its class).
        rules = [cls.hook.__name__] if cls.hook is not None else []
        rules += [type(cls.stages).__name__] if cls.stages is not None else []
        row = [f"`{name}`", f"`{cls.__name__}`", cls.paper, cls.summary, kinds, ", ".join(rules)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render(readme: str) -> str:
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{variants_table()}\n{END}{tail}"


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(render(path.read_text()))
