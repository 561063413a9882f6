"""App configuration of ``shop``."""

from __future__ import annotations

from django.apps import AppConfig


class ShopConfig(AppConfig):
    """``demoproject.shop``, labelled ``shop``."""

    name = "demoproject.shop"
    label = "shop"
    default_auto_field = "django.db.models.BigAutoField"
