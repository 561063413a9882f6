"""``manage.py pool_connections``."""
