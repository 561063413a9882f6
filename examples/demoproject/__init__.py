"""A small Django project whose database connections come from django-gevent-pool.

Served by ``examples/demo.py`` (gunicorn, gevent workers) and used by
``examples/script.py`` (a monkey-patched script).
"""
