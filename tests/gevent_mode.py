"""pytest plugin loaded first (``-p tests.gevent_mode`` in pyproject.toml).

In ``DGP_TEST_MODE=gevent`` (the default) it monkey-patches the process before
pytest-django imports Django: Django's per-thread connection storage must be
created greenlet-local, as it is in a gunicorn gevent worker.
"""

from __future__ import annotations

import os

MODE = os.environ.get("DGP_TEST_MODE", "gevent")
if MODE not in ("gevent", "threads"):
    raise RuntimeError(f"DGP_TEST_MODE must be 'gevent' or 'threads', got {MODE!r}")
if MODE == "gevent":
    from gevent import monkey

    monkey.patch_all()
