"""URLs of chatproxy; include them under a prefix, e.g. ``path("chat/", include("chatproxy.urls"))``."""

from django.urls import path

from chatproxy import views

app_name = "chatproxy"

urlpatterns = [
    path("stream/", views.stream_view, name="stream"),
]
