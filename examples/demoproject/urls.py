"""URLs of the demo project: four small JSON endpoints."""

from __future__ import annotations

from django.urls import path

from demoproject.shop import views

urlpatterns = [
    path("item/<int:pk>/", views.item, name="item"),
    path("sleep/", views.sleep, name="sleep"),
    path("tx/", views.tx, name="tx"),
    path("stats/", views.stats, name="stats"),
]
