"""The PostGIS backend: geometry in and out through pooled connections.

Runs in a subprocess with its own settings (django.contrib.gis needs GDAL and
the server needs the postgis extension). Where PostGIS is not installed (the
embedded fallback server has none) the test says so and is skipped, unless
``DGP_REQUIRE_POSTGIS=1`` (set by .ci/run, which installs it) makes that a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import psycopg2
import pytest

from django_gevent_pool import devserver

from .support import server

SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()

    import json, sys
    import django
    from django.conf import settings
    from django_gevent_pool.devserver import django_settings

    settings.configure(
        DATABASES={"default": {
            "ENGINE": "django_gevent_pool.backends.postgis",
            **django_settings(sys.argv[1]),
            "OPTIONS": {"MAX_CONNS": 2},
        }},
        INSTALLED_APPS=["django.contrib.gis"],
        USE_TZ=True,
    )
    django.setup()

    import gevent
    from django.contrib.gis.db import models
    from django.contrib.gis.geos import Point
    from django.db import connection, connections
    from django_gevent_pool.backends.base import get_pool

    class Place(models.Model):
        name = models.CharField(max_length=20)
        location = models.PointField(srid=4326)

        class Meta:
            app_label = "gis"
            db_table = "dgp_place"

    with connection.schema_editor() as editor:
        editor.execute("DROP TABLE IF EXISTS dgp_place")
        editor.create_model(Place)
    connection.close()

    def work(i):
        Place.objects.create(name=f"p{i}", location=Point(i, i, srid=4326))
        p = Place.objects.get(name=f"p{i}")
        connection.close()
        return [p.location.x, p.location.y, p.location.srid]

    jobs = [gevent.spawn(work, i) for i in range(10)]
    gevent.joinall(jobs, raise_error=True)
    near = list(Place.objects.filter(location__dwithin=(Point(0, 0, srid=4326), 1.5))
                .order_by("name").values_list("name", flat=True))
    stats = get_pool("default").get_stats()
    with connection.schema_editor() as editor:
        editor.delete_model(Place)
    connection.close()
    print(json.dumps({"points": [j.value for j in jobs], "near": near,
                      "opened": stats["connections_num"], "vendor": connection.vendor,
                      "engine": type(connections["default"]).__module__}))
    """
)


def _postgis_ready(dsn: str) -> str | None:
    """None if PostGIS and GDAL are usable, else why not."""
    try:
        from django.contrib.gis.gdal import libgdal  # noqa: F401
    except Exception as exc:  # OSError/ImproperlyConfigured when GDAL is missing
        return f"GDAL library not available ({exc})"
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'postgis'")
            if not cur.fetchone()[0]:
                return "the server has no postgis extension"
            cur.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    finally:
        conn.close()
    return None


def test_postgis_backend_round_trips_geometry(tmp_path: Any) -> None:
    dsn = devserver.ensure_database(server()["admin"], "dgp_gis")
    why = _postgis_ready(dsn)
    if why is not None:
        if os.environ.get("DGP_REQUIRE_POSTGIS") == "1":
            pytest.fail(f"DGP_REQUIRE_POSTGIS=1 but {why}")
        pytest.skip(why)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, dsn], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["points"] == [[float(i), float(i), 4326] for i in range(10)]
    assert result["near"] == ["p0", "p1"]
    assert result["opened"] <= 2
    assert result["engine"] == "django_gevent_pool.backends.postgis.base"
