"""``manage.py`` of the host-budget test project, monkey-patched first when asked.

With ``DGP_HB_MODE=gevent`` the process is patched before anything else is
imported, as a gevent script or management command is; otherwise it runs
with OS threads.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("DGP_HB_MODE") == "gevent":
    from gevent import monkey

    monkey.patch_all()


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.budgetapp.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
