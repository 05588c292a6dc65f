"""How the pipeline shows results: the one table formatter and the one matplotlib set-up every report uses."""
from __future__ import annotations

import logging
from typing import Any

__all__ = ["text_table", "pyplot"]


def text_table(head: list[str], cells: list[list[str]], markdown: bool = False) -> str:
    """Rows of strings as an aligned console table, or as markdown."""
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*c) for c in cells])


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (drivers and workers have no display), with matplotlib's
    font and category chatter silenced."""
    import matplotlib

    matplotlib.use("Agg")
    for noisy in ("matplotlib", "matplotlib.font_manager", "matplotlib.category"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    return plt
