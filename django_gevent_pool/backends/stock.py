"""Loading Django's stock PostgreSQL backend bound to psycopg2.

Django's ``postgresql`` backend picks its driver once per process, at import
time of ``django.db.backends.postgresql.psycopg_any``: psycopg 3 if it can be
imported, else psycopg2. This pool lends psycopg2 connections, so when psycopg
3 is installed too, Django's backend must be imported with psycopg 3 hidden.
That choice is process-wide (it is Django's, not ours): if some other code has
already imported Django's backend with psycopg 3, the two cannot be mixed and
we say so.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from django.core.exceptions import ImproperlyConfigured

_PSYCOPG_ANY = "django.db.backends.postgresql.psycopg_any"


def import_with_psycopg2(module: str) -> ModuleType:
    """Import ``module`` (a Django PostgreSQL backend module) bound to psycopg2.

    Raises ``ImproperlyConfigured`` if Django's PostgreSQL backend was already
    imported with psycopg 3 in this process.
    """
    loaded = sys.modules.get(_PSYCOPG_ANY)
    if loaded is not None:
        if loaded.is_psycopg3:
            raise ImproperlyConfigured(
                "django-gevent-pool lends psycopg2 connections, but Django's PostgreSQL "
                "backend was already loaded with psycopg 3 in this process (another "
                "DATABASES alias uses django.db.backends.postgresql?). Django picks one "
                "driver per process: use django_gevent_pool's ENGINE for every PostgreSQL "
                "alias, or uninstall psycopg 3."
            )
    if module in sys.modules:
        return sys.modules[module]
    # Hidden even when psycopg_any is loaded already (bound to psycopg2): the
    # backend's base module also tries `import psycopg` itself.
    saved = {name: sys.modules[name] for name in ("psycopg",) if name in sys.modules}
    sys.modules["psycopg"] = None  # type: ignore[assignment]  # makes `import psycopg` fail
    try:
        return importlib.import_module(module)
    finally:
        if "psycopg" in saved:
            sys.modules["psycopg"] = saved["psycopg"]
        else:
            del sys.modules["psycopg"]
