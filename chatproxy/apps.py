from django.apps import AppConfig
from django.core.signals import setting_changed


class ChatProxyConfig(AppConfig):
    name = "chatproxy"
    verbose_name = "chatproxy"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from chatproxy import cachecalls, checks, circuit, conf, service  # noqa: F401  (checks register themselves)

        setting_changed.connect(conf.clear_cache, dispatch_uid="chatproxy.conf.clear_cache")
        setting_changed.connect(service.forget_upstreams, dispatch_uid="chatproxy.service.forget_upstreams")
        setting_changed.connect(circuit.forget, dispatch_uid="chatproxy.circuit.forget")
        setting_changed.connect(cachecalls.forget_shared, dispatch_uid="chatproxy.cachecalls.forget_shared")
