"""The demo shop's two tables; created and seeded by the orchestrator, not by migrations."""

from __future__ import annotations

from django.db import models


class Item(models.Model):
    """Something for sale; ``stock`` goes down by one per order."""

    name = models.CharField(max_length=100)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    stock = models.IntegerField(default=0)

    class Meta:
        managed = False
        db_table = "bench_item"

    def __str__(self) -> str:
        return self.name


class Order(models.Model):
    """One order of one item, written in the same transaction as the stock update."""

    item = models.ForeignKey(Item, on_delete=models.CASCADE, related_name="orders")
    quantity = models.IntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        managed = False
        db_table = "bench_order"

    def __str__(self) -> str:
        return f"{self.quantity} x item {self.item_id}"
