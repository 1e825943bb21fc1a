"""chatproxy's models.

* ``AccessKey``: API keys for the OpenAI-compatible endpoint (SPEC 10).
* ``TimeoutProfile``: per-model timeouts tuned in the admin (SPEC 8); see :mod:`chatproxy.profiles`.
* ``StreamRecord``: one row per finished stream (SPEC 8); see :mod:`chatproxy.records`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import ProtectedError
from django.db.models.signals import post_delete, post_save, pre_delete
from django.dispatch import receiver
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from chatproxy import profiles
from chatproxy.conf import DEFAULTS, ON_PARTIAL_CHOICES
from chatproxy.profiles import DEFAULT_NAME as DEFAULT_PROFILE
from chatproxy.profiles import DEFAULT_PATTERN

KEY_PREFIX = "cpk_"
# last_used is written at most this often per key, so busy keys cost no write per request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_key(plain: str) -> str:
    """SHA-256 of a key. Keys carry 192 random bits, so a fast hash is enough (no brute force)."""
    return hashlib.sha256(plain.encode()).hexdigest()


class AccessKeyQuerySet(models.QuerySet["AccessKey"]):
    def active(self) -> AccessKeyQuerySet:
        return self.filter(revoked=False, owner__is_active=True)


class AccessKey(models.Model):
    """An API key. Only its hash and a short lookup prefix are stored; the key is shown once."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chatproxy_keys")
    name = models.CharField(_("name"), max_length=100, blank=True)
    prefix = models.CharField(_("prefix"), max_length=12, unique=True, editable=False)
    key_hash = models.CharField(_("hashed key"), max_length=64, editable=False)
    created = models.DateTimeField(_("created"), auto_now_add=True)
    last_used = models.DateTimeField(_("last used"), null=True, blank=True, editable=False)
    revoked = models.BooleanField(_("revoked"), default=False)

    objects = AccessKeyQuerySet.as_manager()

    class Meta:
        verbose_name = _("access key")
        verbose_name_plural = _("access keys")
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.name or 'key'} ({KEY_PREFIX}{self.prefix}…)"

    @classmethod
    def generate(cls, owner: models.Model, name: str = "") -> tuple[AccessKey, str]:
        """Create a key for ``owner``; returns the saved row and the plain key (shown once)."""
        prefix = secrets.token_hex(6)
        plain = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(24)}"
        key = cls.objects.create(owner=owner, name=name, prefix=prefix, key_hash=hash_key(plain))
        return key, plain

    @staticmethod
    def split(plain: str) -> str | None:
        """The lookup prefix of a well-formed key, or None."""
        if not plain.startswith(KEY_PREFIX):
            return None
        prefix, sep, secret = plain[len(KEY_PREFIX) :].partition("_")
        if not sep or len(prefix) != 12 or not secret or prefix.strip("0123456789abcdef"):
            return None  # only well-formed prefixes reach the database
        return prefix

    def matches(self, plain: str) -> bool:
        return hmac.compare_digest(self.key_hash, hash_key(plain))

    def needs_touch(self) -> bool:
        return self.last_used is None or timezone.now() - self.last_used >= LAST_USED_RESOLUTION


# --------------------------------------------------------------------------- timeout profiles

_TIMEOUT_DEFAULTS = DEFAULTS["TIMEOUTS"]
# Durations that must be > 0, and those that may be 0 (no backoff, never wait for Retry-After).
POSITIVE_SECONDS = (
    "connect_timeout", "first_token_timeout", "stall_timeout", "deadline", "keepalive_interval", "gateway_timeout",
)
NON_NEGATIVE_SECONDS = ("backoff_initial", "backoff_max", "retry_after_max")
MAX_ATTEMPTS_LIMIT = 10


def _seconds(verbose: str, default: float, help_text: str) -> models.FloatField:
    return models.FloatField(verbose, default=default, help_text=help_text)


class TimeoutProfile(models.Model):
    """Timeouts for the models whose name matches ``model_pattern`` (SPEC 8).

    The most specific enabled match wins (:mod:`chatproxy.profiles`); the profile named
    ``default`` always exists, cannot be disabled or deleted, and matches every model.
    Validation lives here (:meth:`clean`), and :meth:`save` runs it, so the admin, model forms
    and the shell all refuse a profile that cannot work, with a message saying what to change.
    """

    name = models.CharField(_("name"), max_length=100, unique=True)
    model_pattern = models.CharField(
        _("model pattern"), max_length=200, default="*",
        help_text=_("A glob on the model name: * any text, ? one character, [abc] one of. "
                    "Examples: o1*, gpt-4o-mini, claude-*. The most specific matching profile wins."),
    )
    connect_timeout = _seconds(_("connect timeout"), _TIMEOUT_DEFAULTS["CONNECT"], _("Seconds, TCP/TLS connect."))
    first_token_timeout = _seconds(
        _("first-token timeout"), _TIMEOUT_DEFAULTS["FIRST_TOKEN"],
        _("Seconds from sending a request to its first chunk. Reasoning models need a minute; chat models a few "
          "seconds."),
    )
    stall_timeout = _seconds(
        _("stall timeout"), _TIMEOUT_DEFAULTS["STALL"],
        _("Longest allowed silence between two chunks, in seconds, before the attempt is retried."),
    )
    deadline = _seconds(
        _("deadline"), _TIMEOUT_DEFAULTS["DEADLINE"],
        _("Seconds for the whole answer: every attempt and backoff included."),
    )
    max_attempts = models.PositiveSmallIntegerField(
        _("max attempts"), default=_TIMEOUT_DEFAULTS["MAX_ATTEMPTS"],
        help_text=_("1 to 10, the first try included."),
    )
    backoff_initial = _seconds(
        _("initial backoff"), _TIMEOUT_DEFAULTS["BACKOFF_INITIAL"],
        _("Seconds before the first retry (doubled each retry, full jitter); 0 retries at once."),
    )
    backoff_max = _seconds(_("maximum backoff"), _TIMEOUT_DEFAULTS["BACKOFF_MAX"], _("Seconds, the backoff cap."))
    retry_after_max = _seconds(
        _("longest Retry-After"), _TIMEOUT_DEFAULTS["RETRY_AFTER_MAX"],
        _("Seconds; an upstream asking to wait longer fails fast instead."),
    )
    keepalive_interval = _seconds(
        _("keepalive interval"), _TIMEOUT_DEFAULTS["KEEPALIVE"],
        _("Seconds of silence towards the client before a keepalive frame; must be well below the gateway timeout."),
    )
    gateway_timeout = _seconds(
        _("gateway timeout"), _TIMEOUT_DEFAULTS["GATEWAY"],
        _("The front proxy's idle deadline in seconds (nginx proxy_read_timeout, load balancer idle timeout)."),
    )
    on_partial = models.CharField(
        _("on partial output"), max_length=10, default=_TIMEOUT_DEFAULTS["ON_PARTIAL"],
        choices=[(choice, choice) for choice in ON_PARTIAL_CHOICES],
        help_text=_("After text was sent: restart the answer, continue it, or fail."),
    )
    enabled = models.BooleanField(_("enabled"), default=True)

    class Meta:
        verbose_name = _("timeout profile")
        verbose_name_plural = _("timeout profiles")
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name if self.name == DEFAULT_PROFILE else f"{self.name} ({self.model_pattern})"

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_PROFILE

    def clean(self) -> None:
        errors: dict[str, list[str]] = {}

        def add(field: str, message: str) -> None:
            errors.setdefault(field, []).append(message)

        if self.pk is not None:
            before = TimeoutProfile.objects.filter(pk=self.pk).values_list("name", flat=True).first()
            if before == DEFAULT_PROFILE and self.name != DEFAULT_PROFILE:
                add("name", "The default profile cannot be renamed: keep the name 'default' "
                            "(create a new profile for a new name).")
        if self.is_default:
            if not self.enabled:
                add("enabled", "The default profile cannot be disabled: it applies to every model no other "
                               "profile matches. Tick 'enabled' (give a model its own profile instead).")
            if self.model_pattern != DEFAULT_PATTERN:
                add("model_pattern", "The default profile matches every model: set its pattern to '*' and "
                                     "create another profile for specific models.")
        elif not (self.model_pattern or "").strip():
            add("model_pattern", "Enter a glob such as 'o1*' or an exact model name.")

        bad = set()
        for name in POSITIVE_SECONDS:
            value = getattr(self, name)
            if value is None or not math.isfinite(value) or value <= 0:
                add(name, "Enter a positive number of seconds (greater than 0).")
                bad.add(name)
        for name in NON_NEGATIVE_SECONDS:
            value = getattr(self, name)
            if value is None or not math.isfinite(value) or value < 0:
                add(name, "Enter a number of seconds, 0 or more.")
                bad.add(name)
        if self.max_attempts is None or not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            add("max_attempts", f"Enter a whole number from 1 to {MAX_ATTEMPTS_LIMIT} (the first try counts as one).")

        if not bad & {"keepalive_interval", "gateway_timeout"} and self.keepalive_interval >= self.gateway_timeout:
            add("keepalive_interval",
                f"Must be shorter than the gateway timeout ({self.gateway_timeout:g} s), or the gateway cuts a "
                f"silent stream before a keepalive goes out: lower it (e.g. to {self.gateway_timeout / 4:g} s) "
                "or raise the gateway timeout.")
        if "deadline" not in bad:
            for name, label in (("stall_timeout", "stall timeout"), ("first_token_timeout", "first-token timeout")):
                if name not in bad and getattr(self, name) >= self.deadline:
                    add(name, f"Must be below the deadline ({self.deadline:g} s), or no retry can ever happen: "
                              f"lower the {label} or raise the deadline.")
        if not bad & {"backoff_initial", "backoff_max"} and self.backoff_initial > self.backoff_max:
            add("backoff_initial",
                f"Must not exceed the maximum backoff ({self.backoff_max:g} s): lower it or raise the maximum.")
        if errors:
            raise ValidationError(errors)

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.full_clean()
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_default:
            raise ProtectedError(DEFAULT_UNDELETABLE, {self})
        return super().delete(*args, **kwargs)


DEFAULT_UNDELETABLE = (
    "The default timeout profile cannot be deleted: it applies to every model no other profile matches."
)


@receiver(pre_delete, sender=TimeoutProfile, dispatch_uid="chatproxy.profile.protect_default")
def _protect_default(sender: Any, instance: TimeoutProfile, **kwargs: Any) -> None:
    # Also covers queryset.delete(), which does not call Model.delete().
    if instance.is_default:
        raise ProtectedError(DEFAULT_UNDELETABLE, {instance})


@receiver(post_save, sender=TimeoutProfile, dispatch_uid="chatproxy.profile.saved")
@receiver(post_delete, sender=TimeoutProfile, dispatch_uid="chatproxy.profile.deleted")
def _profiles_changed(sender: Any, **kwargs: Any) -> None:
    profiles.changed()


# --------------------------------------------------------------------------- stream records


class StreamRecord(models.Model):
    """What happened to one stream (SPEC 8), written once when it ends (:mod:`chatproxy.records`).

    ``retry_reasons`` holds the reason of each retry in order, separated by spaces
    (``"stall stall"``); ``time_to_first_token`` is None when no text was sent.
    """

    stream_id = models.CharField(_("stream id"), max_length=64, db_index=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                             related_name="chatproxy_streams", verbose_name=_("user"))
    username = models.CharField(_("username"), max_length=150, blank=True,
                                help_text=_("Kept when the user is deleted."))
    model = models.CharField(_("model"), max_length=200)
    profile = models.CharField(_("profile"), max_length=100)
    started = models.DateTimeField(_("started"), db_index=True)
    time_to_first_token = models.FloatField(_("time to first token"), null=True, blank=True,
                                            help_text=_("Seconds from the start to the first text sent."))
    longest_gap = models.FloatField(_("longest gap"), default=0.0,
                                    help_text=_("Seconds, the longest silence between two upstream chunks."))
    attempts = models.PositiveSmallIntegerField(_("attempts"), default=1)
    retry_reasons = models.CharField(_("retry reasons"), max_length=200, blank=True)
    outcome = models.CharField(_("outcome"), max_length=32, db_index=True,
                               help_text=_("'done' or the error code the stream ended with."))
    duration = models.FloatField(_("duration"), help_text=_("Seconds."))
    chars_sent = models.PositiveIntegerField(_("characters sent"), default=0)

    class Meta:
        verbose_name = _("stream record")
        verbose_name_plural = _("stream records")
        ordering = ["-started"]
        indexes = [models.Index(fields=["model", "started"], name="chatproxy_record_model_started")]

    def __str__(self) -> str:
        return f"{self.model} {self.outcome} {self.started:%Y-%m-%d %H:%M:%S}"

    @property
    def who(self) -> str:
        return self.username or "anonymous"

    @property
    def retry_reason_list(self) -> list[str]:
        return self.retry_reasons.split()
