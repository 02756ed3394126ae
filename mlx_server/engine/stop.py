"""Stop strings over streamed text: hold back what might be the start of a stop string,
release it as soon as it cannot be, and cut the text where a stop string begins."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add text; return (text safe to emit, the stop string matched or None). After a match
        the rest of the text is dropped."""
        if not self.stops:
            return text, None
        self._pending += text
        hit_at, hit = -1, None
        for stop in self.stops:
            i = self._pending.find(stop)
            if i != -1 and (hit_at == -1 or i < hit_at):
                hit_at, hit = i, stop
        if hit is not None:
            out = self._pending[:hit_at]
            self._pending = ""
            return out, hit
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, None

    def flush(self) -> str:
        """At the end of a generation, whatever was held back is plain text."""
        out, self._pending = self._pending, ""
        return out
