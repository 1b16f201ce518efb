"""Stop strings on streamed text.

The detokenizer emits whole characters; ``StopStringMatcher`` sits after it and decides what
may be shown now. Text that could still turn into a stop string is withheld until it either
completes a stop (then it and everything after it are dropped) or stops matching (then it is
released).

Rules:
- Generation stops at the first character that completes any stop string, whatever way the
  text was split into pushes.
- If several stop strings complete on that same character, the one starting earliest (the
  longest) wins: the emitted text ends just before it.
- Stop strings are matched exactly (case and Unicode code points as given); empty ones are ignored.
"""

from __future__ import annotations

from typing import Sequence


class StopStringMatcher:
    """Incremental stop-string matcher for one sequence.

    >>> m = StopStringMatcher(["é!"])
    >>> m.push("caf"), m.push("é"), m.push("!")
    (('caf', False), ('', False), ('', True))
    """

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            stops = [stops]
        for stop in stops:
            if not isinstance(stop, str):
                raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stop for stop in stops if stop))
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended generation
        self._pending = ""  # withheld text: the longest tail that is a proper prefix of a stop

    def push(self, text: str) -> tuple[str, bool]:
        """Add newly decoded text; return ``(text safe to emit now, stopped)``.

        After a stop, every further push returns ``("", True)``.
        """
        if self.stopped:
            return "", True
        buffer = self._pending + text
        best = None  # (end, start, stop) of the stop completing first, then starting earliest
        for stop in self.stops:
            start = buffer.find(stop)  # the first occurrence is also the first to complete
            if start != -1 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is not None:
            self.stopped, self.matched, self._pending = True, best[2], ""
            return buffer[: best[1]], True
        keep = self._partial_tail_length(buffer)
        self._pending = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """At the end of generation (no stop hit): the withheld text. Empty after a stop."""
        pending, self._pending = self._pending, ""
        return "" if self.stopped else pending

    def _partial_tail_length(self, buffer: str) -> int:
        """Length of the longest tail of ``buffer`` that is a proper prefix of some stop string."""
        if not buffer:
            return 0
        last = buffer[-1]
        best = 0
        for stop in self.stops:
            # A prefix stop[:n] can be the tail only if it ends with the buffer's last character.
            n = min(len(stop) - 1, len(buffer))
            while n > best:
                n = stop.rfind(last, 0, n) + 1
                if n <= best:
                    break
                if buffer.endswith(stop[:n]):
                    best = n
                    break
                n -= 1
        return best
