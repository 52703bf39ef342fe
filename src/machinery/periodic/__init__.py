"""Periodic tasks and workflows: cron specs (``schedule``) and the scheduler that fires them."""

from .schedule import CronSchedule, EverySchedule, Schedule, parse_go_duration, parse_spec
from .scheduler import LOCK_PREFIX, PeriodicEntry, Scheduler, fresh_copy

__all__ = [
    "LOCK_PREFIX",
    "CronSchedule",
    "EverySchedule",
    "PeriodicEntry",
    "Schedule",
    "Scheduler",
    "fresh_copy",
    "parse_go_duration",
    "parse_spec",
]
