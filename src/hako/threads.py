"""Work done by a short-lived thread of its own, for what changes the calling thread for good.

A thread that unshares or enters a namespace (its network namespace, or its root and cwd and so
its mount namespace) keeps it until it ends: doing that work in a thread made for it leaves the
caller's threads as they were. The thread's outcome, value or exception, is the caller's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_own_thread(work: Callable[[], T], name: str) -> T:
    """``work()``, run by a new thread named ``name`` that ends with it."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
