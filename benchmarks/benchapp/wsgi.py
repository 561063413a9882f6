"""WSGI entry point of the Django-served competitors."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchapp.settings")

application = get_wsgi_application()
