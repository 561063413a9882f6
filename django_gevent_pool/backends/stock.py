"""Loading Django's stock PostgreSQL backend bound to the driver an engine lends.

Django's ``postgresql`` backend picks its driver once per process, at import
time of ``django.db.backends.postgresql.psycopg_any``: psycopg 3 if it can be
imported, else psycopg2. Our ``postgresql_psycopg2`` engine needs Django's
backend bound to psycopg2 (imported with psycopg 3 hidden), our
``postgresql_psycopg3`` engine needs it bound to psycopg 3, and our
``postgresql`` and ``postgis`` engines take whatever Django picks. That choice
is process-wide (it is Django's, not ours): two engines that need different
drivers cannot be mixed in one process, and we say so.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from django.core.exceptions import ImproperlyConfigured

_PSYCOPG_ANY = "django.db.backends.postgresql.psycopg_any"

#: Our driver names, as Django's backend would load them.
PSYCOPG2 = "psycopg2"
PSYCOPG = "psycopg"


def default_driver() -> str:
    """The driver Django's PostgreSQL backend uses in this process, or would pick now.

    Once Django's backend is loaded, its choice; before, psycopg 3 when it can
    be imported (as Django decides), else psycopg2.
    """
    loaded = sys.modules.get(_PSYCOPG_ANY)
    if loaded is not None:
        return PSYCOPG if loaded.is_psycopg3 else PSYCOPG2
    if sys.modules.get("psycopg", False) is None:  # hidden (by us, or by the user)
        return PSYCOPG2
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return PSYCOPG2
    return PSYCOPG


#: Our engines that force a driver; the others follow Django's choice.
_ENGINE_DRIVERS = {
    "django_gevent_pool.backends.postgresql_psycopg2": PSYCOPG2,
    "django_gevent_pool.backends.postgresql_psycopg3": PSYCOPG,
    "django_gevent_pool.backends.mysql": "pymysql",
}


def engine_driver(engine: str) -> str:
    """The driver the ENGINE ``engine`` (one of ours) lends connections of."""
    return _ENGINE_DRIVERS.get(engine.rstrip("."), None) or default_driver()


def import_stock(module: str, driver: str) -> ModuleType:
    """Import ``module`` (a Django PostgreSQL backend module) bound to ``driver``.

    ``driver`` is ``"psycopg2"`` or ``"psycopg"``. Raises ``ImproperlyConfigured``
    if Django's PostgreSQL backend was already imported with the other driver
    in this process, or if ``driver`` is not installed.
    """
    loaded = sys.modules.get(_PSYCOPG_ANY)
    if loaded is not None:
        in_use = PSYCOPG if loaded.is_psycopg3 else PSYCOPG2
        if in_use != driver:
            raise ImproperlyConfigured(
                f"this django_gevent_pool engine lends {_NAMES[driver]} connections, but "
                f"Django's PostgreSQL backend was already loaded with {_NAMES[in_use]} in "
                "this process (another DATABASES alias uses another engine?). Django "
                "picks one driver per process: use engines of the same driver for every "
                "PostgreSQL alias (django_gevent_pool.backends.postgresql follows "
                "Django's choice)."
            )
    if driver == PSYCOPG:
        if importlib.util.find_spec("psycopg") is None:
            raise ImproperlyConfigured(
                "django_gevent_pool.backends.postgresql_psycopg3 needs psycopg 3: "
                "pip install 'psycopg[binary]'"
            )
        return importlib.import_module(module)
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


_NAMES = {PSYCOPG2: "psycopg2", PSYCOPG: "psycopg 3"}
