"""A tiny Django project whose processes share one host budget (``HOST_MAX_CONNS``).

Run in subprocesses by ``tests/test_host_budget_processes.py``: gunicorn
gevent workers (``gunicorn_conf.py``, ``wsgi.py``), a Celery worker with the
gevent pool (``celeryapp.py``) and management commands (``manage.py``). Every
knob comes from ``DGP_HB_*`` environment variables (see ``settings.py``).
"""
