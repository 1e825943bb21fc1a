"""chatproxy's models. ``AccessKey``: API keys for the OpenAI-compatible endpoint (SPEC 10)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

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
        if not sep or len(prefix) != 12 or not secret:
            return None
        return prefix

    def matches(self, plain: str) -> bool:
        return hmac.compare_digest(self.key_hash, hash_key(plain))

    def needs_touch(self) -> bool:
        return self.last_used is None or timezone.now() - self.last_used >= LAST_USED_RESOLUTION
