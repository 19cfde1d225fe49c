"""Turning generated token bytes into text that is safe to send: UTF-8 and stop strings."""

from __future__ import annotations

import codecs


class StopMatcher:
    """Withholds text that may be the start of a stop string; cuts at the first full match."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add `text`; returns (text safe to emit now, whether a stop string was reached)."""
        if not self.stops:  # nothing to withhold (most requests; this runs for every token)
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        keep = max((_overlap(buf, s) for s in self.stops), default=0)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Whatever is still withheld once generation ended without a stop string."""
        held, self._held = self._held, ""
        return held


def _overlap(buf: str, stop: str) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of `stop`."""
    for k in range(min(len(stop) - 1, len(buf)), 0, -1):
        if buf.endswith(stop[:k]):
            return k
    return 0


class TextStream:
    """Bytes of generated tokens in, emit-ready text out (partial UTF-8 and stops handled)."""

    def __init__(self, stops: list[str]) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)

    def feed(self, piece: bytes) -> tuple[str, bool]:
        return self._stops.feed(self._utf8.decode(piece))

    def flush(self) -> str:
        text, _ = self._stops.feed(self._utf8.decode(b"", final=True))
        return text + self._stops.flush()
