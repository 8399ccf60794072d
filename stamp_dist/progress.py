"""Progress bars for long work: tqdm on stderr, with rate and ETA.

In a terminal the bar refreshes continuously; in a log file (SLURM, CI) it writes one line every
30 s instead of thousands of carriage-return updates.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(**kwargs) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(file=sys.stderr, dynamic_ncols=True, mininterval=0.2 if interactive else 30.0, **kwargs)
