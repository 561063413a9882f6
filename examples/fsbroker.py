"""A Celery broker and result store made of folders, for the examples: no server to run.

:func:`filesystem_broker` returns the Celery settings: kombu's filesystem
transport and Celery's file result backend, each with one fix. Both write a
file in place, so a reader can find it still empty or half written: the
worker then dies on ``JSONDecodeError`` ("Unrecoverable error") when it picks
up a message its producer is still writing, and a result can be read
half-stored. Here every message and every result is written under a hidden
temporary name and renamed into place, which a reader sees all at once.

For trying things out on one machine. In production use Redis or RabbitMQ.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from time import monotonic
from typing import Any

from celery.backends.filesystem import FilesystemBackend
from kombu.transport import filesystem
from kombu.utils.encoding import ensure_bytes, str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    """kombu's filesystem channel, whose messages appear in the folder complete or not at all."""

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        """Write the message under a hidden name, then rename it to the name readers look for."""
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # Readers take only names of the form "<anything>.<queue>.msg".
        hidden = os.path.join(self.data_folder_out, f".{uuid.uuid4()}.tmp")
        try:
            with open(hidden, "wb") as out:
                out.write(str_to_bytes(dumps(payload)))
            os.replace(hidden, final)
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    """kombu's filesystem transport with :class:`Channel`."""

    Channel = Channel


class FileBackend(FilesystemBackend):
    """Celery's file result backend, whose results appear complete or not at all."""

    def set(self, key: bytes, value: Any) -> None:
        """Write the result under a hidden name, then rename it into place."""
        final = self._filename(key)
        hidden = self.sep.join((self.path, b".%s.%s.tmp" % (key, uuid.uuid4().hex.encode())))
        with self.open(hidden, "wb") as out:
            out.write(ensure_bytes(value))
        os.replace(hidden, final)


def filesystem_broker(folder: Path) -> dict[str, Any]:
    """Celery settings for a broker and a result store in folders under ``folder``.

    The folders are created if missing. Producers and workers must use the
    same ``folder``.
    """
    queue, control, results = folder / "queue", folder / "control", folder / "results"
    for path in (queue, control, results):
        path.mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": "filesystem://localhost//",
        "broker_transport": f"{__name__}:Transport",
        "broker_transport_options": {
            # One folder both ways: producers write the messages the worker reads.
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "control_folder": str(control),
            # Seconds between looks at an empty folder (a real broker pushes).
            "polling_interval": 0.1,
        },
        "result_backend": f"{__name__}:FileBackend+file://{results}",
    }
