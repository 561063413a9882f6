"""URLs of the demo project: four small JSON endpoints, and the pool's stats for staff."""

from __future__ import annotations

from django.contrib.admin.views.decorators import staff_member_required
from django.urls import path

from demoproject.shop import views
from django_gevent_pool.observability import stats_view

urlpatterns = [
    path("item/<int:pk>/", views.item, name="item"),
    path("sleep/", views.sleep, name="sleep"),
    path("tx/", views.tx, name="tx"),
    path("stats/", views.stats, name="stats"),
    # Behind your own access control: anonymous users are sent to the login page.
    path("ops/pool-stats/", staff_member_required(stats_view, login_url="/login/")),
]
