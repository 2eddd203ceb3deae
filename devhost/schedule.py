"""NCRONTAB schedules as Azure Functions timers use them: six fields, ``sec min hour day month day-of-week``.

https://learn.microsoft.com/azure/azure-functions/functions-bindings-timer#ncrontab-expressions
Supports ``*``, values, ranges ``a-b``, steps ``*/n`` and ``a-b/n``, lists ``a,b``, and month / day
names. A TimeSpan schedule (``hh:mm:ss``) means "every interval".
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

_NAMES = {
    4: {m: i for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
                                   start=1)},
    5: {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
}
_BOUNDS = [(0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 6)]
_FIELDS = ["second", "minute", "hour", "day", "month", "day-of-week"]
MAX_SEARCH_DAYS = 366 * 5


class ScheduleError(ValueError):
    pass


def _field(text: str, index: int) -> frozenset[int]:
    low, high = _BOUNDS[index]
    values: set[int] = set()
    for part in text.lower().split(","):
        match = re.fullmatch(r"(\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/(\d+))?", part)
        if not match:
            raise ScheduleError(f"{_FIELDS[index]} field {part!r} is not NCRONTAB")
        span, step = match.group(1), int(match.group(2) or 1)
        if span == "*":
            start, end = low, high
        else:
            ends = [_NAMES.get(index, {}).get(x, x) for x in span.split("-")]
            try:
                start, end = int(ends[0]), int(ends[-1])
            except ValueError:
                raise ScheduleError(f"{_FIELDS[index]} field {part!r} is not a number or name") from None
            if match.group(2) and len(ends) == 1:
                end = high
        if index == 5 and end == 7:
            end = 6 if start < 7 else 0  # 7 is Sunday too
            start = min(start, end)
        if not (low <= start <= high and low <= end <= high and start <= end and step > 0):
            raise ScheduleError(f"{_FIELDS[index]} field {part!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Schedule:
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    interval: dt.timedelta | None = None

    @classmethod
    def parse(cls, expression: str) -> Schedule:
        text = expression.strip()
        if re.fullmatch(r"\d{1,2}:\d{2}:\d{2}", text):
            h, m, s = (int(x) for x in text.split(":"))
            interval = dt.timedelta(hours=h, minutes=m, seconds=s)
            if not interval:
                raise ScheduleError("a TimeSpan schedule must be longer than zero")
            empty = frozenset()
            return cls(empty, empty, empty, empty, empty, empty, interval)
        parts = text.split()
        if len(parts) != 6:
            raise ScheduleError(f"{expression!r}: NCRONTAB needs 6 fields (sec min hour day month dow), "
                                f"got {len(parts)}")
        return cls(*(_field(p, i) for i, p in enumerate(parts)))

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The first occurrence strictly after ``moment`` (UTC)."""
        if self.interval is not None:
            return moment + self.interval
        start = moment.replace(microsecond=0) + dt.timedelta(seconds=1)
        day = start.replace(hour=0, minute=0, second=0)
        for _ in range(MAX_SEARCH_DAYS):
            # cron's Sunday = 0; Python's Monday = 0
            if day.month in self.months and day.day in self.days and (day.weekday() + 1) % 7 in self.weekdays:
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        for second in sorted(self.seconds):
                            candidate = day.replace(hour=hour, minute=minute, second=second)
                            if candidate >= start:
                                return candidate
            day += dt.timedelta(days=1)
        raise ScheduleError("the schedule never fires")
