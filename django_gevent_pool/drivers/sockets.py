"""Socket-level operations any driver's connection allows, given its socket descriptor."""

from __future__ import annotations

import _socket
import os
from typing import Any


def cut(conn: Any) -> None:
    """Shut ``conn``'s socket (``conn.fileno()``) in both directions; never raises."""
    try:
        fd = conn.fileno()
    except Exception:  # no socket left: nothing to shut
        return
    cut_fd(fd)


def cut_fd(fd: int) -> None:
    """Shut socket ``fd`` in both directions, without the driver's lock; never raises.

    The party waiting on the connection (a query, a ping) wakes with an error
    at once, the server ends the session when it next reads, and closing the
    connection later sends nothing that could wait on a silent network. The
    descriptor itself stays open (its owner closes it).
    """
    try:
        sock = _socket.socket(fileno=os.dup(fd))
    except Exception:  # not a socket any more: nothing to shut
        return
    try:
        sock.shutdown(_socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


def hung_up_fd(fd: int) -> bool:
    """Has the peer closed socket ``fd`` (all it sent read)? Never waits, never raises.

    A peek without the driver's lock, on a duplicate of the descriptor (a
    plain socket, never gevent's, so it cannot wait): end of stream, or a
    socket in error, is a hang-up; data or nothing yet is not.
    """
    try:
        sock = _socket.socket(fileno=os.dup(fd))
    except Exception:  # not a socket any more
        return True
    try:
        return sock.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # open, nothing to read: the peer is still there
    except OSError:
        return True  # reset, or in error: the session is gone
    finally:
        sock.close()


def detach(conn: Any) -> None:
    """Point ``conn``'s socket descriptor (``conn.fileno()``) at /dev/null, for a forked child.

    Whatever the child then does with the connection object (close, garbage
    collection, a wait that was in flight) goes nowhere, instead of onto a
    socket the parent still uses. A closed connection has nothing shared.
    Never raises for a connection without a socket.
    """
    try:
        fd = conn.fileno()
    except Exception:  # closed already, or no socket yet: nothing shared
        return
    detach_fd(fd)


def detach_fd(fd: int) -> None:
    """Point descriptor ``fd`` at /dev/null (see :func:`detach`)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
