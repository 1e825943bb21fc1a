"""System checks (``python manage.py check``). Ids are stable and never reused.

* ``chatproxy.E001`` a ``CHATPROXY["TIMEOUTS"]`` value is invalid or the values contradict each other
* ``chatproxy.E002`` ``UPSTREAM.SDK`` / ``UPSTREAM.HTTP_CLIENT`` is not a known choice
* ``chatproxy.E003`` the openai SDK generation asked for is not installed
* ``chatproxy.E004`` ``PERMISSION`` cannot be imported
* ``chatproxy.W001`` no upstream API key is configured
"""

from __future__ import annotations

from typing import Any

from django.core.checks import Error, Warning, register
from django.utils.module_loading import import_string

from chatproxy import conf
from chatproxy.upstream import INSTALL_CURRENT, INSTALL_LEGACY, detect_sdk


@register("chatproxy")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    problems: list[Any] = []
    config = conf.get_config()
    try:
        policy = conf.settings_policy()
    except (TypeError, ValueError) as exc:
        return [Error(f"CHATPROXY['TIMEOUTS'] has a value of the wrong type: {exc}", id="chatproxy.E001",
                      hint="Timeouts are numbers of seconds; MAX_ATTEMPTS is a whole number.")]
    for problem in policy.problems():
        problems.append(Error(f"CHATPROXY['TIMEOUTS']: {problem}.", id="chatproxy.E001",
                              hint="Fix the value in settings.CHATPROXY['TIMEOUTS'] (SPEC section 5)."))

    upstream = config["UPSTREAM"]
    if upstream["SDK"] not in conf.SDK_CHOICES or upstream["HTTP_CLIENT"] not in conf.HTTP_CLIENT_CHOICES:
        problems.append(Error(
            f"CHATPROXY['UPSTREAM']: SDK={upstream['SDK']!r}, HTTP_CLIENT={upstream['HTTP_CLIENT']!r}.",
            id="chatproxy.E002",
            hint=f"SDK is one of {conf.SDK_CHOICES}; HTTP_CLIENT one of {conf.HTTP_CLIENT_CHOICES}.",
        ))
    else:
        problems += _check_sdk(upstream["SDK"])
    try:
        import_string(config["PERMISSION"])
    except ImportError as exc:
        problems.append(Error(f"CHATPROXY['PERMISSION'] cannot be imported: {exc}", id="chatproxy.E004",
                              hint="Use a dotted path such as 'chatproxy.permissions.authenticated'."))
    if not conf.upstream_api_key():
        problems.append(Warning("No upstream API key: set OPENAI_API_KEY or CHATPROXY['UPSTREAM']['API_KEY'].",
                                id="chatproxy.W001"))
    return problems


def _check_sdk(wanted: str) -> list[Any]:
    installed = detect_sdk()
    if wanted == "auto" and installed is not None:
        return []
    if wanted == installed:
        return []
    if installed is None:
        found = "no usable openai package is installed"
    else:
        found = f"the installed openai package is the {installed} generation"
    need = INSTALL_LEGACY if wanted == "legacy" else INSTALL_CURRENT
    return [Error(f"CHATPROXY['UPSTREAM']['SDK'] is {wanted!r} but {found}.", id="chatproxy.E003",
                  hint=f"Install it: {need}, or change UPSTREAM.SDK.")]
