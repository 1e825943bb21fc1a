"""URLs of chatproxy; include them under a prefix, e.g. ``path("chat/", include("chatproxy.urls"))``."""

from django.urls import path, re_path

from chatproxy import openai_responses, openai_views, views

app_name = "chatproxy"

urlpatterns = [
    path("stream/", views.stream_view, name="stream"),
    path("stream/<str:stream_id>/", views.resume_view, name="resume"),
    path("stream/<str:stream_id>/cancel/", views.cancel_view, name="cancel"),
    path("v1/chat/completions", openai_views.chat_completions, name="openai-chat-completions"),
    path("v1/models", openai_views.models, name="openai-models"),
    path("v1/responses", openai_responses.create, name="openai-responses"),
    path("v1/responses/<str:response_id>", openai_responses.retrieve, name="openai-response"),
    path("v1/responses/<str:response_id>/cancel", openai_responses.cancel, name="openai-response-cancel"),
    # Last: anything else under the OpenAI-compatible prefix is OpenAI's JSON 404, not an HTML page.
    re_path(r"^v1(?:/.*)?$", openai_views.not_found, name="openai-not-found"),
]
