"""Markdown tables for the benchmarks' outputs and READMEs (no torch: benchmarks/kernels.py runs
without it)."""
from __future__ import annotations


def markdown_table(headers: list[str], rows: list[list], align: str) -> str:
    """A Markdown table; ``align`` holds one letter per column, ``l`` (text) or ``r`` (numbers)."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(str(c) for c in cells) + " |" for cells in [headers, rule, *rows])
