"""One way to write numbers for people: durations, dollars, counts and plain figures, for the plan, the report card
and the model card alike. None (nothing measured) is always "-"."""


def fmt_seconds(seconds: "float | None") -> str:
    """45 s, 3.2 min (from 2 minutes), 1.25 h (from an hour)."""
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def fmt_dollars(value: "float | None") -> str:
    return "-" if value is None else f"${value:,.2f}"


def fmt_count(value) -> str:
    """1.23B, 4.50M, 12.00k, 950."""
    if value is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:,.0f}"


def fmt_number(value, spec: str = ".4f") -> str:
    """`format(value, spec)`, or "-" for None."""
    return "-" if value is None else format(value, spec)
