"""Admin for chatproxy's models.

* Access keys: secrets are never shown; keys appear by prefix only.
* Timeout profiles: edited with the model's validation; an action applies the timeouts
  suggested by the recorded streams.
* Stream records: read-only list with filters, and a statistics page per model (percentiles,
  suggestions, histograms as inline SVG) with buttons that apply a suggestion, and per fallback
  target (answers served, fallbacks taken, circuit openings).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.translation import gettext_lazy as _

from chatproxy import records
from chatproxy.conf import settings_policy
from chatproxy.models import DEFAULT_UNDELETABLE, AccessKey, StreamRecord, TimeoutProfile
from chatproxy.policy import PROFILE_FIELDS, from_profile
from chatproxy.profiles import DEFAULT_NAME as DEFAULT_PROFILE

if TYPE_CHECKING:  # ModelAdmin is generic for the type checker only (not subscriptable at run time)
    from django_stubs_ext import StrOrPromise

    AccessKeyAdminBase = admin.ModelAdmin[AccessKey]
    TimeoutProfileAdminBase = admin.ModelAdmin[TimeoutProfile]
    StreamRecordAdminBase = admin.ModelAdmin[StreamRecord]
else:
    AccessKeyAdminBase = TimeoutProfileAdminBase = StreamRecordAdminBase = admin.ModelAdmin


@admin.register(AccessKey)
class AccessKeyAdmin(AccessKeyAdminBase):
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


# --------------------------------------------------------------------------- timeout profiles


@admin.register(TimeoutProfile)
class TimeoutProfileAdmin(TimeoutProfileAdminBase):
    """Profiles are validated by the model; ``default`` can be tuned but not renamed, disabled or deleted."""

    list_display = ("name", "model_pattern", "first_token_timeout", "stall_timeout", "deadline", "max_attempts",
                    "keepalive_interval", "gateway_timeout", "on_partial", "enabled")
    list_filter = ("enabled", "on_partial")
    search_fields = ("name", "model_pattern")
    fieldsets = (
        (None, {"fields": ("name", "model_pattern", "enabled")}),
        (_("Detecting a stuck upstream"), {"fields": ("connect_timeout", "first_token_timeout", "stall_timeout")}),
        (_("Retrying"), {"fields": ("deadline", "max_attempts", "backoff_initial", "backoff_max", "retry_after_max",
                                    "on_partial")}),
        (_("Keeping the client connection alive"), {"fields": ("keepalive_interval", "gateway_timeout")}),
        (_("Falling back to other models"), {"fields": ("fallbacks",)}),
    )
    actions = ["delete_selected", "apply_suggestions"]

    def get_readonly_fields(self, request: HttpRequest, obj: TimeoutProfile | None = None) -> Any:
        if obj is not None and obj.is_default:
            return ("name", "model_pattern", "enabled")
        return ()

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        # A new profile starts from the default profile's values.
        initial = super().get_changeform_initial_data(request)
        default = TimeoutProfile.objects.filter(name=DEFAULT_PROFILE).first()
        if default is not None:
            for name in PROFILE_FIELDS:
                initial.setdefault(name, getattr(default, name))
        return initial

    def has_delete_permission(self, request: HttpRequest, obj: TimeoutProfile | None = None) -> bool:
        if obj is not None and obj.is_default:
            return False
        return super().has_delete_permission(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: Any) -> None:
        if queryset.filter(name=DEFAULT_PROFILE).exists():
            messages.warning(request, DEFAULT_UNDELETABLE)
        super().delete_queryset(request, queryset.exclude(name=DEFAULT_PROFILE))

    @admin.action(description=_("Delete selected timeout profiles"), permissions=["delete"])
    def delete_selected(self, request: HttpRequest, queryset: Any) -> Any:
        """Django's bulk delete, leaving ``default`` out of the selection (with a message)."""
        if queryset.filter(name=DEFAULT_PROFILE).exists():
            queryset = queryset.exclude(name=DEFAULT_PROFILE)
            messages.warning(request, f"{DEFAULT_UNDELETABLE} It was left out of the selection.")
            if not queryset.exists():
                return None
        return delete_selected(self, request, queryset)

    @admin.action(description=_("Apply suggested timeouts (from each profile's streams of the last 7 days)"),
                  permissions=["change"])
    def apply_suggestions(self, request: HttpRequest, queryset: Any) -> None:
        since = records.window_start("7d")
        for profile in queryset:
            _apply(request, profile, records.samples_for(since, profile=profile.name))


def _apply(request: HttpRequest, profile: TimeoutProfile, samples: list[records.Sample]) -> None:
    """Apply what ``samples`` suggest to ``profile``, reporting the outcome as admin messages."""
    suggestion = records.suggest(samples, from_profile(profile))
    if suggestion is None:
        messages.warning(request, f"{profile.name}: not enough recorded streams ({len(samples)}; "
                                  f"{records.MIN_SAMPLES} needed). Nothing changed.")
        return
    try:
        changes = records.apply_suggestion(profile, suggestion)
    except ValidationError as exc:
        messages.error(request, f"{profile.name}: the suggestion was not applied: {' '.join(exc.messages)}")
        return
    if not changes:
        messages.info(request, f"{profile.name}: already at the suggested values.")
        return
    summary = ", ".join(f"{name} {before:g} → {after:g} s" for name, (before, after) in changes.items())
    messages.success(request, f"{profile.name}: {summary} (from {suggestion.samples} streams).")


# --------------------------------------------------------------------------- stream records


class RetryReasonFilter(admin.SimpleListFilter):
    title = _("retry reason")
    parameter_name = "retry_reason"
    REASONS = ("connect", "first_token", "stall", "upstream_error", "rate_limited", "disconnected")

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, StrOrPromise]]:
        return [("none", _("no retry")), *((reason, reason) for reason in self.REASONS)]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        value = self.value()
        if value == "none":
            return queryset.filter(retry_reasons="")
        if value in self.REASONS:
            # Whole words only: "connect" must not match "disconnected".
            return queryset.filter(retry_reasons__regex=rf"(^| ){value}( |$)")
        return queryset


@admin.register(StreamRecord)
class StreamRecordAdmin(StreamRecordAdminBase):
    """Read-only: records are written by chatproxy. The statistics page is at ``stats/``."""

    list_display = ("started", "who_display", "model", "profile", "outcome", "attempts", "retry_reasons",
                    "answered_by", "ttft_display", "gap_display", "duration_display", "chars_sent")
    list_filter = ("outcome", "model", "profile", RetryReasonFilter, ("started", admin.DateFieldListFilter))
    search_fields = ("stream_id", "username", "model", "profile", "outcome", "answered_by")
    date_hierarchy = "started"
    list_select_related = ()
    change_list_template = "chatproxy/admin/streamrecord/change_list.html"
    fields = ("stream_id", "started", "user", "username", "model", "profile", "outcome", "attempts",
              "retry_reasons", "answered_by", "abandoned", "circuits_opened", "time_to_first_token", "longest_gap",
              "duration", "chars_sent")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: StreamRecord | None = None) -> bool:
        return False

    @admin.display(description=_("who"), ordering="username")
    def who_display(self, obj: StreamRecord) -> str:
        return obj.who

    @admin.display(description=_("first token"), ordering="time_to_first_token")
    def ttft_display(self, obj: StreamRecord) -> str:
        return "—" if obj.time_to_first_token is None else f"{obj.time_to_first_token:.3f} s"

    @admin.display(description=_("longest gap"), ordering="longest_gap")
    def gap_display(self, obj: StreamRecord) -> str:
        return f"{obj.longest_gap:.3f} s"

    @admin.display(description=_("duration"), ordering="duration")
    def duration_display(self, obj: StreamRecord) -> str:
        return f"{obj.duration:.2f} s"

    def get_urls(self) -> list[Any]:
        stats = self.admin_site.admin_view(self.stats_view)
        return [path("stats/", stats, name="chatproxy_streamrecord_stats"), *super().get_urls()]

    def stats_view(self, request: HttpRequest) -> HttpResponse:
        """Per model: TTFT / gap percentiles, retry rate, suggested timeouts, histograms."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        window = request.POST.get("window") or request.GET.get("window") or records.DEFAULT_WINDOW
        if window not in records.WINDOWS:
            window = records.DEFAULT_WINDOW
        if request.method == "POST":
            self._stats_post(request, window)
            return HttpResponseRedirect(f"{request.path}?window={window}")
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": _("Stream statistics"),
            "window": window,
            "windows": list(records.WINDOWS),
            "stats": records.model_stats(window),
            "targets": records.target_stats(window),
            "sample_limit": records.SAMPLE_LIMIT,
            "min_samples": records.MIN_SAMPLES,
            "can_change_profiles": request.user.has_perm("chatproxy.change_timeoutprofile"),
            "can_add_profiles": request.user.has_perm("chatproxy.add_timeoutprofile"),
            "formulas": records.FORMULAS,
            "round_to": records.ROUND_TO,
        }
        return TemplateResponse(request, "chatproxy/admin/streamrecord/stats.html", context)

    def _stats_post(self, request: HttpRequest, window: str) -> None:
        model = request.POST.get("model", "")
        action = request.POST.get("action")
        profile, _current = records.current_profile(model)
        samples = records.samples_for(records.window_start(window), model=model)
        if action == "apply":
            if not request.user.has_perm("chatproxy.change_timeoutprofile"):
                raise PermissionDenied
            if profile is None:
                messages.error(request, f"No enabled profile applies to {model}.")
                return
            _apply(request, profile, samples)
        elif action == "create":
            if not request.user.has_perm("chatproxy.add_timeoutprofile"):
                raise PermissionDenied
            _create_for_model(request, model, profile, samples)
        else:
            messages.error(request, "Unknown action.")


def _create_for_model(request: HttpRequest, model: str, template: TimeoutProfile | None,
                      samples: list[records.Sample]) -> None:
    """A new profile matching exactly ``model``: the current profile's values plus the suggestion."""
    if TimeoutProfile.objects.filter(model_pattern=model).exists():
        messages.error(request, f"A profile with the pattern {model!r} exists already: apply to it instead.")
        return
    base = from_profile(template) if template is not None else settings_policy()
    suggestion = records.suggest(samples, base)
    if suggestion is None:
        messages.warning(request, f"{model}: not enough recorded streams ({len(samples)}; "
                                  f"{records.MIN_SAMPLES} needed). Nothing created.")
        return
    values = base.profile_values()
    values.update(suggestion.values())
    name = model[:100]
    if TimeoutProfile.objects.filter(name=name).exists():
        name = f"{model[:90]} (model)"
    try:
        profile = TimeoutProfile.objects.create(name=name, model_pattern=model, **values)
    except ValidationError as exc:
        messages.error(request, f"{model}: the profile was not created: {' '.join(exc.messages)}")
        return
    messages.success(request, f"Created the profile {profile.name!r} for {model} with the suggested timeouts.")
