"""Where a request's time goes, by stage: one set of names for every decoding loop.

Plain, speculative and self-speculative decoding share the round structure
``draft → forward → verdict → kv_compact → update``; each loop marks the end of a stage with
:meth:`RoundClock.lap`, and ``Generator.last_stats["stages"]`` reports seconds per stage::

    prefill      the prompt's forward (or the prefix cache's copy + the suffix's forward)
    draft        the drafter's proposal (self-speculation: the exit layers' forward)
    forward      the target's graph call: decode step, or the tree-verify call
    verdict      greedy / sampled acceptance, or the plain loop's argmax / draw
    kv_compact   moving the accepted path's K/V to the row's next slots
    update       the drafter's bookkeeping after a round (Token Recycling's matrix …)
    bookkeeping  everything else in Python: writing tokens, stop checks, streaming

A plain decoding round has no draft, kv_compact or update time.
"""

from __future__ import annotations

import time

STAGES = ("prefill", "draft", "forward", "verdict", "kv_compact", "update", "bookkeeping")


class RoundClock:
    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Charge the time since the previous lap to ``stage``."""
        now = time.perf_counter()
        self.seconds[stage] += now - self._last
        self._last = now

    def stats(self) -> dict:
        return {name: round(value, 6) for name, value in self.seconds.items()}
