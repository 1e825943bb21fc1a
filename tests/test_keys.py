"""API keys for the OpenAI-compatible endpoint: ``AccessKey``, the admin, ``chatproxy_key``."""

from __future__ import annotations

import io
import json
import re
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.utils import timezone

from chatproxy import models
from chatproxy.auth import AuthFailure, user_from_key
from chatproxy.models import AccessKey, hash_key
from project.asgi import application
from tests.asgi_calls import call

KEY_PATTERN = re.compile(r"\Acpk_[0-9a-f]{12}_[A-Za-z0-9_-]{32}\Z")


def owner_of(plain: str):
    return async_to_sync(user_from_key)(plain)


# --------------------------------------------------------------------------- the model


@pytest.mark.django_db
def test_keys_are_random_and_stored_only_as_a_hash():
    alice = User.objects.create_user("alice")
    plains = [AccessKey.generate(alice, f"k{i}")[1] for i in range(200)]
    assert all(KEY_PATTERN.match(p) for p in plains)  # 48 bits of prefix + 192 bits of secret
    assert len(set(plains)) == 200 and len({p[4:16] for p in plains}) == 200
    for row, plain in zip(AccessKey.objects.order_by("created", "pk"), plains, strict=True):
        assert row.prefix == plain[4:16]
        assert row.key_hash == hash_key(plain) and len(row.key_hash) == 64
        stored = " ".join(str(value) for value in row.__dict__.values())
        assert plain not in stored and plain.split("_", 2)[2] not in stored  # neither the key nor its secret
        assert plain not in str(row) and plain.split("_", 2)[2] not in repr(row)


@pytest.mark.django_db
def test_key_lookup(monkeypatch):
    alice = User.objects.create_user("alice")
    key, plain = AccessKey.generate(alice)
    compared = []
    real = models.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(models.hmac, "compare_digest", spy)
    assert owner_of(plain) == alice
    assert compared == [(key.key_hash, hash_key(plain))]  # constant-time comparison of the hashes

    for wrong in (plain[:-1] + ("A" if plain[-1] != "A" else "B"),  # same prefix, another secret
                  f"cpk_{'0' * 12}_{plain.split('_', 2)[2]}",  # another prefix
                  "cpk_zzzzzzzzzzzz_secret", "cpk_", "", "sk-" + plain, plain + " ", "Bearer " + plain):
        with pytest.raises(AuthFailure) as refused:
            owner_of(wrong)
        assert refused.value.status == 401 and refused.value.code == "invalid_api_key"


@pytest.mark.parametrize("bad", ["cpk_abc_x", "cpk_ABCDEF012345_x", "cpk_0123456789ab_", "cpk_0123456789ab",
                                 "xyz_0123456789ab_x", "cpk_0123456789a\x00_x", "cpk_0123456789ag_x"])
def test_malformed_keys_never_reach_the_database(bad):
    assert AccessKey.split(bad) is None


@pytest.mark.django_db
def test_revoked_keys_and_inactive_owners_are_refused():
    alice = User.objects.create_user("alice")
    key, plain = AccessKey.generate(alice)
    assert owner_of(plain) == alice
    key.revoked = True
    key.save()
    with pytest.raises(AuthFailure):
        owner_of(plain)
    key.revoked = False
    key.save()
    alice.is_active = False
    alice.save()
    with pytest.raises(AuthFailure):
        owner_of(plain)


@pytest.mark.django_db
def test_last_used_is_written_at_most_once_a_minute(django_assert_num_queries):
    alice = User.objects.create_user("alice")
    key, plain = AccessKey.generate(alice)
    assert key.last_used is None
    with django_assert_num_queries(2):  # the lookup, then the first touch
        owner_of(plain)
    first = AccessKey.objects.get(pk=key.pk).last_used
    assert first is not None and timezone.now() - first < timedelta(seconds=5)
    with django_assert_num_queries(1):  # within the minute: the lookup only
        owner_of(plain)
    assert AccessKey.objects.get(pk=key.pk).last_used == first
    AccessKey.objects.filter(pk=key.pk).update(last_used=first - timedelta(seconds=61))
    with django_assert_num_queries(2):
        owner_of(plain)
    assert AccessKey.objects.get(pk=key.pk).last_used > first


# --------------------------------------------------------------------------- chatproxy_key


@pytest.mark.django_db
def test_command_prints_a_working_key_once():
    alice = User.objects.create_user("alice")
    out = io.StringIO()
    call_command("chatproxy_key", "create", "alice", "--name", "ci", stdout=out)
    plain = out.getvalue().strip()
    assert KEY_PATTERN.match(plain)
    row = AccessKey.objects.get()
    assert row.name == "ci" and row.owner == alice and row.prefix == plain[4:16]
    assert owner_of(plain) == alice
    with pytest.raises(CommandError, match="No user named 'bob'"):
        call_command("chatproxy_key", "create", "bob", stdout=io.StringIO())


# --------------------------------------------------------------------------- the admin


@pytest.mark.django_db
def test_admin_shows_a_new_key_once_and_revokes(admin_client, admin_user):
    response = admin_client.post("/admin/chatproxy/accesskey/add/",
                                 {"owner": admin_user.pk, "name": "laptop", "revoked": ""}, follow=True)
    assert response.status_code == 200
    shown = [str(m) for m in response.context["messages"]]
    plains = [word for m in shown for word in m.split() if word.startswith("cpk_")]
    assert len(plains) == 1 and "will not be shown again" in shown[0]
    plain = plains[0]
    assert response.content.decode().count(plain) == 1  # on the page after saving, once
    key = AccessKey.objects.get()
    assert key.name == "laptop" and key.key_hash == hash_key(plain) and owner_of(plain) == admin_user

    for page in ("/admin/chatproxy/accesskey/", f"/admin/chatproxy/accesskey/{key.pk}/change/",
                 "/admin/chatproxy/accesskey/add/", "/admin/chatproxy/accesskey/?q=laptop"):
        body = admin_client.get(page).content.decode()
        assert plain not in body and plain.split("_", 2)[2] not in body
        assert key.prefix in body or page.endswith("add/")

    response = admin_client.post("/admin/chatproxy/accesskey/",
                                 {"action": "revoke", "_selected_action": [key.pk]})
    assert response.status_code == 302
    assert AccessKey.objects.get().revoked
    with pytest.raises(AuthFailure):
        owner_of(plain)


@pytest.mark.django_db
def test_admin_cannot_edit_the_hash_or_the_prefix(admin_client, admin_user):
    key, plain = AccessKey.generate(admin_user, "old")
    admin_client.post(f"/admin/chatproxy/accesskey/{key.pk}/change/",
                      {"owner": admin_user.pk, "name": "renamed", "key_hash": "0" * 64, "prefix": "0" * 12})
    key.refresh_from_db()
    assert key.name == "renamed" and key.key_hash == hash_key(plain) and key.prefix == plain[4:16]


# --------------------------------------------------------------------------- the endpoint


@pytest.fixture
def endpoint_settings(sim, settings):
    settings.CHATPROXY = {
        "UPSTREAM": {"BASE_URL": sim.base_url, "API_KEY": "sk-test-keys"},
        "RESUME": {"GRACE": 0.0},
        "RECORDS": {"ENABLED": False},
    }
    return settings


BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Keys? [[sim chunks=3]]"}]})


async def completion(authorization: str | None, *, session: bool = False):
    headers = [(b"authorization", authorization.encode())] if authorization is not None else []
    return await call(application, "POST", "/chat/v1/chat/completions", BODY.encode(), headers=headers,
                      session=session)


@pytest.mark.django_db(transaction=True)
async def test_endpoint_with_keys(endpoint_settings, sim):
    alice = await sync_to_async(User.objects.create_user)("alice")
    key, plain = await sync_to_async(AccessKey.generate)(alice, "ci")

    ok = await completion(f"Bearer {plain}")  # no cookie, no CSRF token: none needed for a key
    assert ok.status == 200 and ok.json()["choices"][0]["message"]["content"]
    ok = await completion(f"bearer   {plain}")  # scheme case and spacing as HTTP allows
    assert ok.status == 200
    models_page = await call(application, "GET", "/chat/v1/models", b"", session=False,
                             headers=[(b"authorization", f"Bearer {plain}".encode())])
    assert models_page.status == 200 and models_page.json()["data"][0]["id"] == "gpt-4o-mini"

    for authorization, code in ((None, "missing_api_key"), ("Bearer ", "invalid_api_key"),
                                ("Bearer nope", "invalid_api_key"), (f"Basic {plain}", "missing_api_key"),
                                (f"Bearer {plain[:-2]}", "invalid_api_key")):
        refused = await completion(authorization)
        assert refused.status == 401, (authorization, refused.body)
        error = refused.json()["error"]
        assert error["code"] == code and error["type"] == "authentication_error"

    key.revoked = True
    await key.asave()
    refused = await completion(f"Bearer {plain}")
    assert refused.status == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert sim.stats()["total_requests"] == 2


@pytest.mark.django_db(transaction=True)
async def test_keys_only_open_the_openai_endpoint(endpoint_settings, sim):
    alice = await sync_to_async(User.objects.create_user)("alice")
    _, plain = await sync_to_async(AccessKey.generate)(alice)
    sse = await call(application, "POST", "/chat/stream/", b'{"messages": [{"role": "user", "content": "x"}]}',
                     headers=[(b"authorization", f"Bearer {plain}".encode())])
    assert sse.status == 403 and sse.json()["error"]["code"] == "permission_denied"
    assert sim.stats()["total_requests"] == 0
