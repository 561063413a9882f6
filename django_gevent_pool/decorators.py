"""Decorators kept for django-db-geventpool users."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def close_connection(func: Callable[P, R]) -> Callable[P, R]:
    """Give every database connection of the current greenlet back after ``func``.

    The same decorator as ``django_db_geventpool.utils.close_connection``, for
    Celery tasks and spawned greenlets: with this pool each connection goes
    back to its pool (nothing is closed on the server), even when ``func``
    raises or its greenlet is killed.
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        finally:
            from django.db import connections

            for conn in connections.all(initialized_only=True):
                conn.close()

    return wrapper
