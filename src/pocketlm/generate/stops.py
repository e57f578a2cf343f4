"""Incremental stop-sequence matching over streamed text.

Text arrives in pieces (one detokenized token at a time) and a stop string may straddle
pieces: "Hel" + "lo\\nUs" + "er:" contains "\\nUser:". `StopMatcher` emits text as soon as
it cannot be part of a stop string, holds back a tail that still could be, and on a match
returns only the text before the stop string. It knows nothing of tokens or models.

Semantics: generation stops at the first moment any stop string has appeared, i.e. at the
match that *ends* earliest; among matches ending at the same character the longest wins.
That is what streaming sees, so every way of splitting the text gives the same result.

Cost: the matcher keeps at most (longest stop - 1) characters, so each `feed` scans only
the new text plus that tail, once per stop string: never the whole generated text.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Watch a stream of text for any of `stops`; empty stop strings are ignored."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(dict.fromkeys(stop for stop in stops if stop))  # dedup, keep order
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._first_chars = frozenset(stop[0] for stop in self._stops)
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the stream, if any

    @property
    def stopped(self) -> bool:
        """True once a stop string has matched; later feeds emit nothing."""
        return self.matched is not None

    def feed(self, text: str) -> tuple[str, bool]:
        """Add `text`; return (text safe to emit now, whether a stop string matched)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        window = self._held + text
        match = self._earliest_match(window)
        if match is not None:
            start, stop = match
            self.matched, self._held = stop, ""
            return window[:start], True
        keep = self._held_length(window)
        self._held = window[len(window) - keep :]
        return window[: len(window) - keep], False

    def flush(self) -> str:
        """Release the held-back text when generation ends for another reason."""
        held, self._held = self._held, ""
        return held

    def _earliest_match(self, window: str) -> tuple[int, str] | None:
        """(start, stop) of the match ending first in `window` (longest on a tie), or None."""
        best: tuple[int, int, str] | None = None  # (end, -length, stop): smallest wins
        for stop in self._stops:
            start = window.find(stop)
            if start >= 0:
                candidate = (start + len(stop), -len(stop), stop)
                best = candidate if best is None else min(best, candidate)
        if best is None:
            return None
        end, _, stop = best
        return end - len(stop), stop

    def _held_length(self, window: str) -> int:
        """Length of the longest tail of `window` that is a proper prefix of a stop string."""
        # Only a tail shorter than the longest stop can still grow into one.
        for start in range(max(0, len(window) - self._longest + 1), len(window)):
            if window[start] in self._first_chars:
                tail = window[start:]
                if any(stop.startswith(tail) for stop in self._stops):
                    return len(window) - start
        return 0
