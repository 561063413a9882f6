"""``manage.py seed --items N``: empty the shop and create items 1..N."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import connection, transaction

from demoproject.shop.models import Item, Order


class Command(BaseCommand):
    help = "Delete every order and item, then create items with primary keys 1..N."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--items", type=int, default=1000, help="how many items (1000)")

    def handle(self, *args: Any, items: int, **options: Any) -> None:
        rng = random.Random(42)
        with transaction.atomic():
            with connection.cursor() as cursor:
                # The views rely on items being numbered 1..N: the counters restart.
                orders, items_table = Order._meta.db_table, Item._meta.db_table
                if connection.vendor == "mysql":
                    # One table at a time (each resets its AUTO_INCREMENT); the
                    # order table's foreign key would refuse it otherwise.
                    cursor.execute("SET FOREIGN_KEY_CHECKS = 0")
                    cursor.execute(f"TRUNCATE {orders}")
                    cursor.execute(f"TRUNCATE {items_table}")
                    cursor.execute("SET FOREIGN_KEY_CHECKS = 1")
                else:
                    cursor.execute(f"TRUNCATE {orders}, {items_table} RESTART IDENTITY")
            Item.objects.bulk_create(
                (
                    Item(
                        name=f"item {n}",
                        price=Decimal(rng.randint(100, 10000)) / 100,
                        stock=rng.randint(1000, 100000),
                    )
                    for n in range(1, items + 1)
                ),
                batch_size=500,
            )
        if options["verbosity"]:
            self.stdout.write(f"seeded {items} items")
