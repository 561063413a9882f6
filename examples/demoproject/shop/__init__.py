"""The ``shop`` app: items and the orders placed on them."""
