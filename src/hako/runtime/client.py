"""Talking to a running sandbox's daemon from another process (the CLI)."""

from __future__ import annotations

from hako.errors import SandboxError
from hako.runtime.agent import AgentClient
from hako.runtime.sandboxd import API_SOCKET
from hako.runtime.sockets import connect_unix
from hako.runtime.state import SandboxState


def connect(state: SandboxState) -> AgentClient:
    """A client of the sandbox's daemon, which serves the agent's API."""
    try:
        sock = connect_unix(state.dir / API_SOCKET)
    except OSError as exc:
        raise SandboxError(
            f"container {state.name} is not reachable ({exc.strerror}): is it still running?"
        ) from exc
    return AgentClient(sock)
