"""Filters for the dashboard: durations and shares in words a person reads at a glance."""

from django import template

register = template.Library()


@register.filter
def duration(value):
    """A timedelta as "4.2 s", "3 min 10 s" or "2 h 5 min"; "—" for none."""
    if value is None:
        return "—"
    seconds = max(value.total_seconds(), 0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{hours // 24} days {hours % 24} h"


@register.filter
def percent(share):
    """0.254 as "25 %"; "—" for none."""
    return "—" if share is None else f"{share * 100:.0f} %"


@register.filter
def get(mapping, key):
    return mapping.get(key)


@register.filter
def words(name):
    """ "usual_hours" as "Usual hours"."""
    return name.replace("_", " ").capitalize()
