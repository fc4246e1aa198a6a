"""The agent's errors, one per gRPC status the service answers with.

    AgentError              INTERNAL
    ├── NotFound            NOT_FOUND: unknown container or exec id
    ├── AlreadyExists       ALREADY_EXISTS
    ├── InvalidArgument     INVALID_ARGUMENT: a bad spec; the message names the field
    ├── FailedPrecondition  FAILED_PRECONDITION: a call in the wrong state, or setup that failed
    │   └── ExecFailed      the process could not be executed (errno, path)
    ├── Unsupported         UNIMPLEMENTED: the guest lacks what the call needs
    └── Cancelled           CANCELLED / DEADLINE_EXCEEDED: a blocking call gave up

The container layer raises these; only the service (the edge) turns them into
ttRPC statuses, so nothing below it imports hako_ttrpc.
"""

from __future__ import annotations

import os


class AgentError(Exception):
    """Something failed that is not the caller's fault (INTERNAL)."""


class NotFound(AgentError):
    pass


class AlreadyExists(AgentError):
    pass


class InvalidArgument(AgentError):
    pass


class FailedPrecondition(AgentError):
    pass


class Unsupported(AgentError):
    pass


class Cancelled(AgentError):
    """A blocking call (wait, read, write) stopped: its connection dropped or its deadline passed."""


class ExecFailed(FailedPrecondition):
    """``execve`` of the process failed: ENOENT (not found), EACCES/ENOEXEC (not executable), ..."""

    def __init__(self, errno: int, path: str, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.path = path
        self.message = message


def exec_message(errno: int, path: str) -> str:
    """Docker's wording for a process that cannot be executed."""
    if errno == 2:  # ENOENT
        if "/" not in path:
            return f'exec: "{path}": executable file not found in $PATH'
        return f'exec: "{path}": stat {path}: no such file or directory'
    reason = os.strerror(errno)
    return f'exec: "{path}": {reason[:1].lower()}{reason[1:]}'
