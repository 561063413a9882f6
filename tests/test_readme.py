"""README.rst is the user's manual: it renders cleanly and every example in it works.

Every ``.. code-block:: python`` block is one of two kinds:

settings
    It assigns ``DATABASES``, ``MIDDLEWARE``, ``INSTALLED_APPS`` or
    ``DJANGO_GEVENT_POOL``. It is executed; each pooled alias's ``OPTIONS``
    must pass the pool's validation and the system checks must find no error
    in it; every ``django_gevent_pool`` dotted path in it must import.
excerpt
    Anything else is an excerpt of a file under ``examples/`` (which the suite
    runs): its lines must appear there verbatim and in order. A line holding
    only ``...`` stands for lines left out.

Commands (``::`` blocks) are run by ``make test``, ``make demo`` and the tests
of the examples, the Celery worker and the management command.
"""

from __future__ import annotations

import importlib
import io
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from django.utils.module_loading import import_string

from django_gevent_pool.backends.base import pool_options_for

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"
EXAMPLES = ROOT / "examples"
SETTINGS_NAMES = ("DATABASES", "MIDDLEWARE", "INSTALLED_APPS", "DJANGO_GEVENT_POOL")


def python_blocks() -> list[tuple[int, str]]:
    """(line number, dedented code) of every ``.. code-block:: python`` in the README."""
    lines = README.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == ".. code-block:: python":
            start = i + 1
            j = start
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith(" ")):
                j += 1
            blocks.append((start + 1, textwrap.dedent("\n".join(lines[start:j])).strip("\n")))
            i = j
        else:
            i += 1
    return blocks


BLOCKS = python_blocks()


def is_settings(code: str) -> bool:
    return any(re.search(rf"^{name}\s*=", code, re.M) for name in SETTINGS_NAMES)


def example_files() -> dict[Path, list[str]]:
    return {
        path: [line.rstrip() for line in path.read_text().splitlines()]
        for path in sorted(EXAMPLES.rglob("*"))
        if path.is_file() and path.suffix in {".py", ".cfg", ".ini", ".txt", ".toml"}
    }


def found_in(chunks: list[list[str]], text: list[str]) -> bool:
    """True if every chunk appears verbatim in ``text``, each after the previous one."""
    pos = 0
    for chunk in chunks:
        for start in range(pos, len(text) - len(chunk) + 1):
            if text[start : start + len(chunk)] == chunk:
                pos = start + len(chunk)
                break
        else:
            return False
    return True


def test_readme_renders_without_warnings() -> None:
    from docutils.core import publish_string

    errors = io.StringIO()
    publish_string(
        README.read_text(),
        writer="html",
        settings_overrides={"warning_stream": errors, "report_level": 2, "halt_level": 5},
    )
    assert errors.getvalue() == ""


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 5
    assert any(is_settings(code) for _, code in BLOCKS)
    assert any(not is_settings(code) for _, code in BLOCKS)


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"line{n}" for n, _ in BLOCKS])
def test_readme_example_works(line: int, code: str) -> None:
    if is_settings(code):
        check_settings_block(code)
        return
    chunks: list[list[str]] = [[]]
    for raw in code.splitlines():
        if raw.strip() == "...":
            chunks.append([])
        else:
            chunks[-1].append(raw.rstrip())
    chunks = [chunk for chunk in chunks if chunk]
    homes = [path for path, text in example_files().items() if found_in(chunks, text)]
    assert homes, f"README line {line}: this block is not an excerpt of any file in examples/"


def check_settings_block(code: str) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), namespace)
    for dotted in re.findall(r"[\"'](django_gevent_pool\.[\w.]+)[\"']", code):
        try:
            import_string(dotted)  # a class or function: MIDDLEWARE, views
        except ImportError:
            importlib.import_module(dotted)  # a module: ENGINE, INSTALLED_APPS
    if "DJANGO_GEVENT_POOL" in namespace:
        check_observability_setting(namespace["DJANGO_GEVENT_POOL"])
    databases = namespace.get("DATABASES", {})
    for alias, settings_dict in databases.items():
        assert settings_dict["ENGINE"].startswith("django_gevent_pool.backends.")
        pool_options_for(alias, settings_dict.get("OPTIONS", {}))
        # An example in the manual is clean: no error, no warning.
        assert _checks_for(alias, settings_dict) == []


def _checks_for(alias: str, settings_dict: dict[str, Any]) -> list[Any]:
    """This package's settings checks on one alias of a README example, but W002.

    W002 is about this process (is psycopg2 cooperative yet), not the example.
    """
    from django.core.checks import run_checks
    from django.test.utils import override_settings

    from django_gevent_pool import checks

    with override_settings(DATABASES={alias: settings_dict}):
        messages = run_checks(tags=[checks.TAG], databases=[])
    return [m for m in messages if m.id != "django_gevent_pool.W002"]


def check_observability_setting(value: Any) -> None:
    """Apply a README's ``DJANGO_GEVENT_POOL`` for real, then turn its log off again."""
    from django.test.utils import override_settings

    from django_gevent_pool import observability

    with override_settings(DJANGO_GEVENT_POOL=value):
        observability.configure_from_settings()  # raises ImproperlyConfigured if wrong
    with override_settings(DJANGO_GEVENT_POOL={"STATS_LOG_INTERVAL": None}):
        observability.configure_from_settings()  # stops the log it started
