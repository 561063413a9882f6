"""URLs of the benchmark app."""

from __future__ import annotations

from django.urls import path

from benchapp import views

urlpatterns = [
    path("item/<int:pk>/", views.item),
    path("sleep/", views.sleep),
    path("tx/", views.tx),
    path("warm/", views.warm),
    path("collect/", views.collect),
    path("info/", views.info),
]
