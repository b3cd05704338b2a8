"""The last hour of traffic, per minute, from the structured events; and its chart as inline SVG.

:class:`Activity` is a ``twisted.logger`` observer: every ``relay`` event (one per copy
relayed or refused, see :mod:`gatekeeper.events`) is counted in the bucket of its
minute by ``outcome``, and ``login`` events by protocol and outcome. Only the last
:data:`WINDOW_MINUTES` minutes are kept: 60 small counters, whatever the traffic.

:func:`relay_chart` draws the relays as stacked bars, one per minute, oldest on the
left, with a legend and a ``<title>`` per bar (a tooltip without JavaScript). It is
built from ``twisted.web.template`` tags, so every text is escaped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogPublisher, globalLogPublisher
from twisted.web.template import Tag
from zope.interface import implementer

__all__ = ["OUTCOME_COLOURS", "RELAY_OUTCOMES", "WINDOW_MINUTES", "Activity", "ActivityService", "relay_chart"]

WINDOW_MINUTES = 60
# The relay outcomes of gatekeeper.events, in the order they are stacked and listed.
RELAY_OUTCOMES = ("encrypted", "signed_only", "plain", "passed_through", "temp_failed", "rejected")
OUTCOME_COLOURS = {
    "encrypted": "#2e7d32",
    "signed_only": "#1565c0",
    "plain": "#9e9e9e",
    "passed_through": "#6a1b9a",
    "temp_failed": "#ef6c00",
    "rejected": "#c62828",
}
_OTHER_COLOUR = "#5d4037"
_MAX_OUTCOME = 32


@implementer(ILogObserver)
class Activity:
    """Counts ``relay`` and ``login`` events per minute over the last hour (on ``clock``'s time)."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._relays: dict[int, Counter[str]] = {}
        self._logins: dict[int, Counter[str]] = {}

    def __call__(self, event: Mapping[str, Any]) -> None:
        """Count one event (anything but ``relay`` and ``login`` is ignored)."""
        kind = event.get("gk_event")
        if kind == "relay":
            table = self._relays
        elif kind == "login":
            table = self._logins
        else:
            return
        minute = int(self.clock.seconds() // 60)
        outcome = str(event.get("outcome") or "unknown")[:_MAX_OUTCOME]
        if kind == "login":
            outcome = f"{str(event.get('protocol') or '?')[:_MAX_OUTCOME]} {outcome}"
        table.setdefault(minute, Counter())[outcome] += 1
        self._forget(table, minute)

    @staticmethod
    def _forget(table: dict[int, Counter[str]], minute: int) -> None:
        for old in [m for m in table if m <= minute - WINDOW_MINUTES]:
            del table[old]

    def _series(self, table: dict[int, Counter[str]]) -> list[tuple[int, Counter[str]]]:
        now = int(self.clock.seconds() // 60)
        return [(minute, Counter(table.get(minute, ()))) for minute in range(now - WINDOW_MINUTES + 1, now + 1)]

    def relays(self) -> list[tuple[int, Counter[str]]]:
        """The last hour's relays: (minute since the epoch, count per outcome), oldest first, 60 entries."""
        return self._series(self._relays)

    def relay_totals(self) -> Counter[str]:
        """Relays per outcome over the last hour."""
        return sum((counts for _, counts in self.relays()), Counter())

    def login_totals(self) -> Counter[str]:
        """Logins per "PROTOCOL OUTCOME" (``smtp ok``, ``imap failed``, ``admin-web ok`` ...) over the last hour."""
        return sum((counts for _, counts in self._series(self._logins)), Counter())


class ActivityService(Service):
    """Feeds the global log events to an :class:`Activity` while the gateway runs."""

    def __init__(self, activity: Activity, publisher: LogPublisher = globalLogPublisher) -> None:
        self.activity = activity
        self.publisher = publisher
        self._observing = False

    def startService(self) -> None:
        """Start counting."""
        super().startService()
        if not self._observing:
            self._observing = True
            self.publisher.addObserver(self.activity)

    def stopService(self) -> None:
        """Stop counting."""
        super().stopService()
        if self._observing:
            self._observing = False
            self.publisher.removeObserver(self.activity)


def _svg(name: str, **attributes: Any) -> Tag:
    return Tag(name)(**{key.rstrip("_").replace("_", "-"): str(value) for key, value in attributes.items()})


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50 ... that is at least ``value`` (an axis maximum)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def relay_chart(series: list[tuple[int, Counter[str]]], *, width: int = 720, height: int = 220) -> Tag:
    """An SVG of relays per minute, stacked by outcome (``series`` as :meth:`Activity.relays` returns it)."""
    left, right, top, bottom = 44, 8, 10, 58
    plot_width, plot_height = width - left - right, height - top - bottom
    peak = max((sum(counts.values()) for _, counts in series), default=0)
    ceiling = _nice_ceiling(max(peak, 2))
    scale = plot_height / ceiling
    extra = sorted({o for _, counts in series for o in counts} - set(RELAY_OUTCOMES))
    outcomes = (*RELAY_OUTCOMES, *extra)
    total = sum((counts for _, counts in series), Counter())
    svg = _svg(
        "svg",
        xmlns="http://www.w3.org/2000/svg",
        width=width,
        height=height,
        viewBox=f"0 0 {width} {height}",
        role="img",
        aria_label=f"Messages per minute by outcome over the last {len(series)} minutes: {sum(total.values())} in all",
        class_="chart",
    )
    base = top + plot_height
    for fraction in (0, 0.5, 1):
        y = base - fraction * plot_height
        svg(_svg("line", x1=left, x2=left + plot_width, y1=f"{y:.1f}", y2=f"{y:.1f}", stroke="#ddd"))
        svg(
            _svg("text", x=left - 6, y=f"{y + 4:.1f}", text_anchor="end", font_size=11, fill="#555")(
                f"{ceiling * fraction:g}"
            )
        )
    slot = plot_width / max(len(series), 1)
    for index, (_, counts) in enumerate(series):
        x = left + index * slot
        y = float(base)
        summary = ", ".join(f"{counts[o]} {o}" for o in outcomes if counts[o]) or "none"
        ago = len(series) - 1 - index
        group = _svg("g")(Tag("title")(f"{ago} min ago: {summary}"))
        for outcome in outcomes:
            count = counts[outcome]
            if not count:
                continue
            bar = count * scale
            y -= bar
            group(
                _svg(
                    "rect",
                    x=f"{x + 1:.1f}",
                    y=f"{y:.1f}",
                    width=f"{max(slot - 2, 1):.1f}",
                    height=f"{bar:.1f}",
                    fill=OUTCOME_COLOURS.get(outcome, _OTHER_COLOUR),
                )
            )
        svg(group)
    for label, index in (("60 min ago", 0), ("30 min ago", len(series) // 2), ("now", len(series) - 1)):
        svg(
            _svg(
                "text",
                x=f"{left + (index + 0.5) * slot:.1f}",
                y=base + 16,
                text_anchor="middle",
                font_size=11,
                fill="#555",
            )(label)
        )
    x, row = float(left), 0
    for outcome in outcomes:
        text = f"{outcome.replace('_', ' ')} ({total[outcome]})"
        advance = 28 + 7 * len(text)  # 12 px text is under 7 px a character
        if x + advance > width and x > left:
            x, row = float(left), row + 1
        y = base + 26 + 16 * row
        colour = OUTCOME_COLOURS.get(outcome, _OTHER_COLOUR)
        svg(_svg("rect", x=f"{x:.1f}", y=y, width=11, height=11, fill=colour))
        svg(_svg("text", x=f"{x + 15:.1f}", y=y + 10, font_size=12, fill="#222")(text))
        x += advance
    return svg
