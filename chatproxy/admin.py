"""Admin for chatproxy's models. Secrets are never shown: keys appear by prefix only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest

from chatproxy.models import AccessKey


@admin.register(AccessKey)
class AccessKeyAdmin(admin.ModelAdmin):
    list_display = ("__str__", "owner", "created", "last_used", "revoked")
    list_filter = ("revoked",)
    search_fields = ("name", "prefix", "owner__username")
    readonly_fields = ("prefix", "created", "last_used")
    fields = ("owner", "name", "revoked", "prefix", "created", "last_used")
    actions = ["revoke"]

    def save_model(self, request: HttpRequest, obj: AccessKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        # A new key: generate it and show the plain key exactly once.
        key, plain = AccessKey.generate(obj.owner, obj.name)
        obj.pk, obj.prefix, obj.key_hash, obj.created = key.pk, key.prefix, key.key_hash, key.created
        obj._state.adding = False
        messages.warning(request, f"The new key is {plain} — copy it now: it will not be shown again.")

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request: HttpRequest, queryset: Any) -> None:
        count = queryset.update(revoked=True)
        messages.success(request, f"{count} key(s) revoked.")
