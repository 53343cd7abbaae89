"""matplotlib for writing figure files, or None (with a message) when it is not installed."""
from __future__ import annotations

import sys


def pyplot(what: str):
    """``matplotlib.pyplot`` on the file-only Agg backend; None, saying that there is no ``what``,
    when matplotlib is missing (plots are a convenience: the run goes on)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {what} (pip install matplotlib)", file=sys.stderr)
        return None
    return plt
