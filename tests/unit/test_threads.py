"""Work done by a thread of its own: its value or its exception is the caller's."""

from __future__ import annotations

import threading

import pytest

from hako.threads import in_own_thread


def test_the_work_runs_in_another_thread_and_its_value_comes_back() -> None:
    caller = threading.get_ident()
    assert in_own_thread(lambda: threading.get_ident() != caller, "t") is True
    assert in_own_thread(lambda: threading.current_thread().name, "netns-create") == "netns-create"


def test_its_exception_is_raised_in_the_caller() -> None:
    def fail() -> None:
        raise OSError(1, "not permitted")

    with pytest.raises(OSError, match="not permitted"):
        in_own_thread(fail, "t")
