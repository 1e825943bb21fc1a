"""``python manage.py chatproxy_prune [--days D] [--dry-run]``: delete old stream records.

Keeps the last ``--days`` days (default ``CHATPROXY["RECORDS"]["RETENTION_DAYS"]``, 30). Run it
daily from cron or a scheduler; records are only ever deleted by this command (or the admin).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from chatproxy import records
from chatproxy.models import StreamRecord


class Command(BaseCommand):
    help = "Delete stream records older than the retention period."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=float, default=None,
                            help="keep this many days (default CHATPROXY['RECORDS']['RETENTION_DAYS'])")
        parser.add_argument("--dry-run", action="store_true", help="only count what would be deleted")

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["days"]
        if days is None:
            days = records.records_config()["RETENTION_DAYS"]
        try:
            days = float(days)
        except (TypeError, ValueError):
            raise CommandError(f"The retention must be a number of days, not {days!r}.") from None
        if days <= 0:
            raise CommandError("The retention must be a positive number of days.")
        older_than = timedelta(days=days)
        if options["dry_run"]:
            count = StreamRecord.objects.filter(started__lt=timezone.now() - older_than).count()
            self.stdout.write(f"{count} stream record(s) older than {days:g} days would be deleted.")
            return
        count = records.prune(older_than)
        self.stdout.write(f"Deleted {count} stream record(s) older than {days:g} days.")
