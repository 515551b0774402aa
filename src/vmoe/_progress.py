"""Progress-bar settings shared by the training loop, data loading and evaluation."""

from __future__ import annotations

import sys
from typing import Any

#: Seconds between progress-bar refreshes when stderr is not a terminal (a log file): each refresh
#: appends a carriage-return update to one ever-growing line there.
LOG_REFRESH_S = 30.0


def bar_kwargs() -> dict[str, Any]:
    """Extra ``tqdm`` keyword arguments: rare refreshes when stderr goes to a file or a pipe."""
    if "ipykernel" in sys.modules:  # Jupyter: tqdm.auto draws a widget, not lines
        return {}
    isatty = getattr(sys.stderr, "isatty", None)
    return {} if isatty is not None and isatty() else {"mininterval": LOG_REFRESH_S}
