"""chatproxy's models.

* ``AccessKey``: API keys for the OpenAI-compatible endpoint.
* ``TimeoutProfile``: per-model timeouts tuned in the admin; see :mod:`chatproxy.profiles`.
* ``StreamRecord``: one row per finished stream; see :mod:`chatproxy.records`.
"""

from __future__ import annotations

import hashlib
import hmac
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

from chatproxy import policy, profiles
from chatproxy.profiles import DEFAULT_NAME as DEFAULT_PROFILE
from chatproxy.profiles import DEFAULT_PATTERN

KEY_PREFIX = "cpk_"
#: The most fallback targets a profile may list.
MAX_FALLBACKS = 10
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


def _policy_field(name: str) -> Any:
    """The model field for the policy knob stored in the field ``name`` (:mod:`chatproxy.policy`)."""
    knob = policy.knob_for_field(name)
    options: dict[str, Any] = {"default": knob.default, "help_text": _(knob.help_text)}
    if knob.kind == "attempts":
        return models.PositiveSmallIntegerField(_(knob.label), **options)
    if knob.kind == "choice":
        choices = [(choice, choice) for choice in knob.choices]
        return models.CharField(_(knob.label), max_length=10, choices=choices, **options)
    return models.FloatField(_(knob.label), **options)


class TimeoutProfile(models.Model):
    """Timeouts for the models whose name matches ``model_pattern``.

    The most specific enabled match wins (:mod:`chatproxy.profiles`); the profile named
    ``default`` always exists, cannot be disabled or deleted, and matches every model.
    The timeouts are :mod:`chatproxy.policy`'s knobs: their defaults, labels, help texts and
    validation are defined there. :meth:`clean` adds what only a profile has (the ``default``
    profile's rules, a pattern), reports the policy's problems on the fields to change, and
    :meth:`save` runs it, so the admin, model forms and the shell all refuse a profile that cannot
    work, with a message saying what to change.
    """

    name = models.CharField(_("name"), max_length=100, unique=True)
    model_pattern = models.CharField(
        _("model pattern"), max_length=200, default="*",
        help_text=_("A glob on the model name: * any text, ? one character, [abc] one of. "
                    "Examples: o1*, gpt-4o-mini, claude-*. The most specific matching profile wins."),
    )
    # The policy's knobs: defaults, labels, help texts and validation come from chatproxy.policy.
    connect_timeout = _policy_field("connect_timeout")
    first_token_timeout = _policy_field("first_token_timeout")
    stall_timeout = _policy_field("stall_timeout")
    deadline = _policy_field("deadline")
    max_attempts = _policy_field("max_attempts")
    backoff_initial = _policy_field("backoff_initial")
    backoff_max = _policy_field("backoff_max")
    retry_after_max = _policy_field("retry_after_max")
    keepalive_interval = _policy_field("keepalive_interval")
    gateway_timeout = _policy_field("gateway_timeout")
    on_partial = _policy_field("on_partial")
    fallbacks = models.TextField(
        _("fallbacks"), blank=True, default="",
        help_text=_("Tried in order when the model's answer fails, one per line: a model on the same upstream "
                    "(gpt-4o-mini) or upstream:model (backup:gpt-4.1-mini, an upstream of CHATPROXY['UPSTREAMS']). "
                    "Empty: CHATPROXY['FALLBACKS'] decides."),
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

        targets = policy.fallback_lines(self.fallbacks)
        if len(targets) > MAX_FALLBACKS:
            add("fallbacks", f"List at most {MAX_FALLBACKS} targets (one per line); each one costs the user time "
                             "when the ones before it fail.")
        for target in targets:
            if len(target.split()) > 1 or len(target) > 200:
                add("fallbacks", f"{target[:60]!r} is not a target: write one model name (or upstream:model) per "
                                 "line, without spaces.")
        values = {knob.name: getattr(self, knob.field) for knob in policy.KNOBS}
        for problem in policy.problems(values, policy.by_label):
            add(problem.knob.field, problem.sentence())
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
    """What happened to one stream, written once when it ends (:mod:`chatproxy.records`).

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
    answered_by = models.CharField(
        _("answered by"), max_length=300, blank=True,
        help_text=_("upstream:model of the target that answered (or was tried last); after a fallback, the "
                    "fallback's."))
    abandoned = models.CharField(_("targets given up"), max_length=300, blank=True,
                                 help_text=_("upstream:model of each target given up for the next one."))
    circuits_opened = models.CharField(_("circuits opened"), max_length=300, blank=True,
                                       help_text=_("upstream:model of each target whose circuit this stream opened."))

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
