"""URLs of the sample project: the admin, chatproxy under ``chat/`` and the demo page."""

from django.contrib import admin
from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import include, path

from project import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("chat/", include("chatproxy.urls")),
    path("", views.index, name="index"),
]

# `manage.py runserver` (daphne's) already serves static files when DEBUG; these patterns do the
# same under a bare `daphne project.asgi:application`. Empty unless DEBUG.
urlpatterns += staticfiles_urlpatterns()
