"""The chatproxy sample project: the demo chat page, the admin and the app, served over ASGI."""
