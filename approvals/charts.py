"""The dashboard's chart, drawn on the server as SVG geometry for a template.

Hand-written rather than a charting library: the page's Content-Security-Policy allows no
inline script or style, the chart must be readable without colour (each outcome has a fill
pattern, the legend names them, a table beside it holds the same numbers), and one stacked bar
chart is a few dozen lines. See docs/architecture.md.
"""

import math
from dataclasses import dataclass

from django.utils import timezone

WIDTH, HEIGHT = 960, 260
LEFT, RIGHT, TOP, BOTTOM = 48, 8, 10, 28  # room for the axes' labels


@dataclass(frozen=True)
class Segment:
    x: float
    y: float
    width: float
    height: float
    key: str
    title: str  # shown on hover, read by screen readers


def nice_ceiling(value):
    """The smallest of 1, 2, 5, 10, 20, 50… at or above `value` (at least 1)."""
    if value <= 1:
        return 1
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)


def stacked_bars(hourly, outcomes):
    """The geometry of one bar per hour, stacked by outcome.

    `hourly` is [(hour start, {outcome key: count}, total)], `outcomes` [(key, label)] in the
    order they stack from the bottom.
    """
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = nice_ceiling(max((total for _, _, total in hourly), default=0))
    slot = plot_width / max(len(hourly), 1)
    gap = min(2, slot * 0.2)
    labels = dict(outcomes)
    segments = []
    for index, (hour, counts, _total) in enumerate(hourly):
        x, y = LEFT + index * slot + gap / 2, TOP + plot_height
        for key, _label in outcomes:
            height = counts[key] / top * plot_height
            if counts[key]:
                y -= height
                local = timezone.localtime(hour)
                title = f"{local:%a %d %b %H:00}: {counts[key]} {labels[key].lower()}"
                geometry = (round(x, 1), round(y, 1), round(slot - gap, 1), round(height, 1))
                segments.append(Segment(*geometry, key, title))
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "left": LEFT,
        "right": WIDTH - RIGHT,
        "bottom": TOP + plot_height,
        "segments": segments,
        "y_ticks": [(TOP + plot_height * (1 - share), round(top * share)) for share in (0, 0.5, 1)],
        "x_ticks": _hour_ticks(hourly, slot),
    }


def _hour_ticks(hourly, slot):
    """A label every 3 hours over a day, every midnight over a week."""
    every = 3 if len(hourly) <= 24 else 24
    ticks = []
    for index, (hour, _counts, _total) in enumerate(hourly):
        local = timezone.localtime(hour)
        if local.hour % every == 0:
            label = f"{local:%H:00}" if every == 3 else f"{local:%a %d}"
            ticks.append((round(LEFT + index * slot, 1), label))
    return ticks
