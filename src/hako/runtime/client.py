"""Talking to a running sandbox's daemon from another process (the CLI); kept light, as it is
on the path of every `hako run` and `hako exec`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from hako.errors import SandboxError
from hako.runtime.agent import AgentClient, translate
from hako.runtime.paths import API_SOCKET
from hako.runtime.sockets import connect_unix
from hako.runtime.state import SandboxState

if TYPE_CHECKING:
    from google.protobuf.message import Message

M = TypeVar("M", bound="Message")


def connect(state: SandboxState) -> AgentClient:
    """A client of the sandbox's daemon, which serves the agent's API."""
    try:
        sock = connect_unix(state.dir / API_SOCKET)
    except OSError as exc:
        raise SandboxError(
            f"container {state.name} is not reachable ({exc.strerror}): is it still running?"
        ) from exc
    return AgentClient(sock)


def destroy(state: SandboxState, timeout: float = 15.0) -> None:
    """Ask the sandbox's daemon to stop it now; HakoError if it cannot be asked, or fails."""
    agent = connect(state)
    try:
        agent.destroy_sandbox(timeout=timeout)
    finally:
        agent.close()


def claim(
    client: AgentClient, name: str, *, auto_remove: bool, notify_path: Path, hostname: str | None = None
) -> float:
    """Take a pooled sandbox (see :mod:`hako.runtime.pool`), as the container ``name`` whose host
    name is ``hostname`` (default: the sandbox's id); returns how long it took to resume."""
    from hako_api import daemon_pb2

    request = daemon_pb2.ClaimRequest(
        name=name,
        auto_remove=auto_remove,
        created=time.time(),
        notify_path=str(notify_path),
        hostname=hostname or "",
    )
    response = _call_daemon(client, "Claim", request, daemon_pb2.ClaimResponse)
    return float(response.took)


def set_paused(client: AgentClient, paused: bool) -> None:
    """Pause the sandbox's VM (its vCPUs stop) or resume it (``hako pause``/``unpause``)."""
    from hako_api import daemon_pb2

    method = "Pause" if paused else "Resume"
    _call_daemon(client, method, daemon_pb2.PauseRequest(), daemon_pb2.PauseResponse)


def _call_daemon(client: AgentClient, method: str, request: Message, response_type: type[M]) -> M:
    """A call of the daemon's own service (hako_api/daemon.proto), its errors translated."""
    from hako_api import daemon_pb2
    from hako_ttrpc import TtrpcError

    service = daemon_pb2.DESCRIPTOR.services_by_name["Daemon"].full_name
    try:
        return client.client.call(service, method, request, response_type, timeout=30)
    except TtrpcError as exc:
        raise translate(exc, method) from exc
