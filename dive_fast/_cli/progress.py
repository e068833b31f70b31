"""The command lines' shared progress bars (the training app's and the world's): live on a
terminal, one update every half minute into a log file or pipe, where tqdm's
carriage-return redraws would otherwise pile up (hundreds of KB for one miniature run).

In ``dive_fast._cli`` so that the world's command and the app both import it without the
world reaching into the app; tqdm is imported on first use."""
from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


def progress_bar(iterable=None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, redrawn at most every ``LOG_INTERVAL_S``
    seconds when its stream is not a terminal (notebook widgets keep tqdm's pace)."""
    from tqdm import autonotebook, std
    from tqdm.auto import tqdm

    stream = kwargs.get("file") or sys.stderr
    is_tty = getattr(stream, "isatty", lambda: False)()
    if autonotebook.tqdm is std.tqdm and not is_tty:  # not in a notebook
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        # tqdm's monitor thread forces a redraw after maxinterval (10 s by default)
        kwargs.setdefault("maxinterval", 2 * LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
