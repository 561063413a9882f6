"""Management commands of django-gevent-pool."""
