"""The host's one exception hierarchy.

Every error hako raises on the host derives from :class:`HakoError`. Lower
layers (subprocess, qemu.qmp, ttRPC, tarfile, JSON) are translated into these at
the edge of the module that calls them. The message is the one line a user sees:
what went wrong, with what, and what to do about it. ``exit_code`` follows
Docker: 125 for an error of hako itself, 126 when the command cannot be
executed, 127 when it is not found.

    HakoError
    ├── UsageError             bad command-line input
    ├── ConfigError            bad config.json, runtime config or option value
    ├── ImageError
    │   └── ImageNotFound
    ├── AssetError             guest kernel / guest image missing or not buildable
    ├── HypervisorError
    │   ├── QemuNotFound
    │   ├── AcceleratorError   the requested accelerator cannot be used here
    │   └── VMDied             QEMU exited or stopped answering
    ├── AgentError             the guest agent failed a request
    ├── SandboxError
    │   └── SandboxNotFound
    ├── ContainerError         a container or process in the wrong state for the request
    │   ├── ContainerNotFound
    │   └── ContainerExists
    └── ExecError              the container's command could not be executed
        ├── ExecNotFound       exit 127
        └── ExecNotExecutable  exit 126
"""

from __future__ import annotations

EXIT_RUNTIME = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


class HakoError(Exception):
    """Base of every hako error; ``str(err)`` is the one-line message."""

    exit_code: int = EXIT_RUNTIME


class UsageError(HakoError):
    pass


class ConfigError(HakoError):
    pass


class ImageError(HakoError):
    pass


class ImageNotFound(ImageError):
    pass


class AssetError(HakoError):
    pass


class HypervisorError(HakoError):
    pass


class QemuNotFound(HypervisorError):
    pass


class AcceleratorError(HypervisorError):
    pass


class VMDied(HypervisorError):
    pass


class TemplateError(HypervisorError):
    """A VM template could not be made, or failed its checks."""


class AgentError(HakoError):
    """A request to the guest agent failed; ``code`` is the ttRPC (gRPC) status code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class NetworkError(HakoError):
    """A sandbox's network: its namespace, tap, veth, bridge, addresses or published ports."""


class SandboxError(HakoError):
    pass


class SandboxNotFound(SandboxError):
    pass


class ContainerError(HakoError):
    pass


class ContainerNotFound(ContainerError):
    pass


class ContainerExists(ContainerError):
    pass


class ExecError(HakoError):
    pass


class ExecNotFound(ExecError):
    exit_code = EXIT_NOT_FOUND


class ExecNotExecutable(ExecError):
    exit_code = EXIT_NOT_EXECUTABLE
