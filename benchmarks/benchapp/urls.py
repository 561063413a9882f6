"""URLs of the benchmark app.

The ``raw-per-query`` reference serves only ``/wait/``, with its own view
(a raw connection per query), and fills its raw connections on ``/warm/``.
"""

from __future__ import annotations

from django.conf import settings
from django.urls import URLPattern, path

from benchapp import views
from benchapp.competitors import RAW_PER_QUERY

common: list[URLPattern] = [
    path("collect/", views.collect),
    path("info/", views.info),
    path("inflight/", views.in_flight),
    path("poolstats/", views.pool_stats),
]

if settings.COMPETITOR == RAW_PER_QUERY:
    urlpatterns = [
        path("wait/", views.wait_raw),
        path("warm/", views.warm_raw),
        *common,
    ]
else:
    urlpatterns = [
        path("item/<int:pk>/", views.item),
        path("sleep/", views.sleep),
        path("tx/", views.tx),
        path("wait/", views.wait),
        path("skewed/", views.skewed),
        path("pid/", views.pid),
        path("warm/", views.warm),
        *common,
    ]
