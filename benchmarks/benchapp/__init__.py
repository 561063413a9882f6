"""The benchmark app: the demo's three views, served the same way by every competitor."""
