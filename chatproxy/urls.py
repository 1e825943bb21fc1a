"""URLs of chatproxy; include them under a prefix, e.g. ``path("chat/", include("chatproxy.urls"))``."""

from django.urls import path

from chatproxy import openai_views, views

app_name = "chatproxy"

urlpatterns = [
    path("stream/", views.stream_view, name="stream"),
    path("stream/<str:stream_id>/", views.resume_view, name="resume"),
    path("stream/<str:stream_id>/cancel/", views.cancel_view, name="cancel"),
    path("v1/chat/completions", openai_views.chat_completions, name="openai-chat-completions"),
    path("v1/models", openai_views.models, name="openai-models"),
]
