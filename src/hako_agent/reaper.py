"""The one place the agent waits for children (it is init: every orphan comes to it).

A single thread blocks in ``waitid(P_ALL, WNOWAIT)``, then reaps the child that
exited under :attr:`Reaper.lock`. Tracked pids get their exit status delivered
to a callback; other children are reaped silently. Because a pid is only ever
freed under the lock, code that holds the lock and sees a tracked process not
yet exited may signal its pid without racing pid reuse (:meth:`Reaper.kill`).

A child can exit before its pid is known to whoever spawned it (the container
init is a grandchild whose pid arrives through a pipe). While a spawn is in
progress (:meth:`spawning` .. :meth:`spawned`), untracked exits are kept, and
:meth:`track` finds the status there.
"""

from __future__ import annotations

import os
import threading

from hako_agent import linux

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    OnExit = Callable[[int], None]


def exit_status(wait_status: int) -> int:
    """A waitpid status -> exit code, or 128 + signal number (the shell's convention)."""
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


class Reaper:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._tracked: dict[int, OnExit] = {}
        self._early: dict[int, int] = {}  # pid -> exit status of untracked children during spawns
        self._spawns = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start reaping; also makes this process a child subreaper so that double-forked
        grandchildren come back to it when it is not PID 1 (tests on the host)."""
        if self._thread is not None:
            return
        if os.getpid() != 1:
            linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the reaper thread (for tests: PID 1 never stops reaping)."""
        thread = self._thread
        if thread is None:
            return
        self._stop = True
        pid = os.fork()  # wakes the blocked waitid
        if pid == 0:
            os._exit(0)
        self._wake.set()
        thread.join()
        try:
            os.waitpid(pid, 0)  # the thread may have stopped before reaping it
        except ChildProcessError:
            pass
        self._thread = None
        self._stop = False
        if os.getpid() != 1:
            linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 0)

    # -- spawning and tracking ------------------------------------------------------------------
    def spawning(self) -> None:
        """A fork is about to happen whose descendants will be tracked."""
        with self.lock:
            self._spawns += 1

    def forked(self) -> None:
        """Call right after each fork: the reaper may have found no children and be idle."""
        self._wake.set()

    def spawned(self) -> None:
        with self.lock:
            self._spawns -= 1
            if self._spawns == 0:
                self._early.clear()

    def track(self, pid: int, on_exit: OnExit) -> None:
        """Deliver ``pid``'s exit status to ``on_exit`` (now, if it already exited during the spawn)."""
        with self.lock:
            status = self._early.pop(pid, None)
            if status is None:
                self._tracked[pid] = on_exit
                return
        on_exit(status)

    def kill(self, pid: int, signum: int) -> bool:
        """Signal a tracked pid that has not been reaped; False if it has (nothing sent)."""
        with self.lock:
            if pid not in self._tracked:
                return False
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                return False  # a zombie about to be reaped: what we wanted is done
            return True

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            self._wake.clear()
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                # No children. Sleep until a spawn forks one (or, as init, until an
                # orphan is reparented to us, which the timeout catches).
                self._wake.wait(1.0)
                continue
            except InterruptedError:
                continue
            if found is None:
                continue
            self._reap(found.si_pid)

    def _reap(self, pid: int) -> None:
        callback = None
        with self.lock:
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                return
            code = exit_status(status)
            callback = self._tracked.pop(pid, None)
            if callback is None and self._spawns:
                self._early[pid] = code
        if callback is not None:
            try:
                callback(code)
            except Exception:  # a broken callback must not stop init from reaping
                from hako_agent import log

                log.exception(f"reaper: exit callback for pid {pid} failed")
