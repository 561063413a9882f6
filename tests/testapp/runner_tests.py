"""Run by Django's own test runner (``manage.py test``) from tests/test_django.py."""

from __future__ import annotations

from django.db import connection, transaction
from django.test import TestCase, TransactionTestCase

from django_gevent_pool.backends.base import get_pool

from .models import Item


class PooledTestCase(TestCase):
    def test_orm_in_a_test_transaction(self) -> None:
        Item.objects.create(name="a")
        self.assertEqual(Item.objects.count(), 1)
        self.assertIsNotNone(get_pool("default"))

    def test_on_commit_captured(self) -> None:
        with self.captureOnCommitCallbacks(execute=True) as callbacks:
            transaction.on_commit(lambda: None)
        self.assertEqual(len(callbacks), 1)


class PooledTransactionTestCase(TransactionTestCase):
    def test_connection_goes_back(self) -> None:
        Item.objects.create(name="b")
        connection.close()
        pool = get_pool("default")
        assert pool is not None
        self.assertEqual(pool.get_stats()["pool_in_use"], 0)
        self.assertEqual(Item.objects.count(), 1)
