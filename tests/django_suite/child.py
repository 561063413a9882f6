"""One run of Django's ``tests/runtests.py``: ``python child.py TESTS_DIR [runtests args]``.

Started by ``run.py``, once per driver, mode and backend.
``DGP_TEST_MODE=gevent`` monkey-patches the process first, before anything
imports ``socket``, ``threading`` or Django (as a gunicorn gevent worker does);
``threads`` leaves gevent out. ``DGP_DJANGO_DRIVER`` (``psycopg2``,
``psycopg`` or ``pymysql``) is the driver of the run, ours (``settings.py``
picks our engine for it) and the stock backend's alike.
``DGP_DJANGO_BACKEND=stock`` runs Django's own PostgreSQL or MySQL backend
instead of ours:

- on psycopg2, with ``psycopg`` hidden (Django prefers psycopg 3 when it can
  import it) and, under gevent, the same gevent wait callback ours installs
  (what psycogreen gives any gevent deployment of the stock backend), so that
  the two runs differ only by the pool;
- on psycopg 3, as any gevent deployment of it runs: psycopg 3 imported after
  the monkey-patching picks its own gevent-friendly wait and gevent's lock, so
  nothing is installed. Ours replaces those with
  ``drivers/psycopg_waiting.py``'s: a failure of that module shows as ours
  only;
- on PyMySQL, installed as ``MySQLdb`` (``pymysql.install_as_MySQLdb()``)
  before Django loads, as our MySQL engine does: PyMySQL is pure Python and
  waits through the ``socket`` module, gevent's once patched, so nothing else
  is installed.
"""

import os
import sys

MODE = os.environ.get("DGP_TEST_MODE", "gevent")
if MODE == "gevent":
    from gevent import monkey

    monkey.patch_all()
elif MODE != "threads":
    raise SystemExit(f"DGP_TEST_MODE must be 'gevent' or 'threads', got {MODE!r}")

import runpy  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    """Run runtests.py from the Django tests folder in ``sys.argv[1]`` with the rest as its args."""
    tests_dir = Path(sys.argv[1]).resolve()
    driver = os.environ.get("DGP_DJANGO_DRIVER", "psycopg2")
    if driver not in ("psycopg2", "psycopg", "pymysql"):
        raise SystemExit(
            f"DGP_DJANGO_DRIVER must be 'psycopg2', 'psycopg' or 'pymysql', got {driver!r}"
        )
    if os.environ.get("DGP_DJANGO_BACKEND") == "stock" and driver == "pymysql":
        import pymysql

        pymysql.install_as_MySQLdb()
    if os.environ.get("DGP_DJANGO_BACKEND") == "stock" and driver == "psycopg2":
        # Django's backend prefers psycopg 3 when importable; the reference
        # run must use psycopg2, like ours.
        sys.modules["psycopg"] = None  # type: ignore[assignment]
        if MODE == "gevent":
            from django_gevent_pool import patch_psycopg2

            patch_psycopg2()
    sys.path[:0] = [str(tests_dir), str(ROOT)]
    sys.argv = [str(tests_dir / "runtests.py"), *sys.argv[2:]]
    os.chdir(tests_dir)
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
