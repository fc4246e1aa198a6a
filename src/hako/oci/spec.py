"""Build the OCI runtime spec (config.json, runtime-spec 1.0.2) a container runs with.

The result is what Docker would hand runc for the same ``docker run`` options: the image's
Entrypoint/Cmd/Env/WorkingDir/User, Docker's default capabilities and rlimits, runc's default
mounts and masked paths, the pid/ipc/uts/mount namespaces (no network namespace: the VM is the
network boundary), and resource limits under the cgroup ``/hako/<container-id>``. With a bundle's
config.json as the base, that spec is kept and only what the options set is changed.

Paths in the result are host paths. :func:`spec_for_guest` rewrites the rootfs and volume
sources to where the guest sees them once the host has shared them into the VM.
"""

from __future__ import annotations

import copy
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hako.errors import ConfigError
from hako.image.config import ImageConfig
from hako.oci import defaults
from hako.oci.users import ExecUser, resolve_user
from hako.oci.validate import validate_spec

MIN_MEMORY = 6 * 1024 * 1024  # Docker's minimum
MIN_CPU_QUOTA = 1000  # the kernel refuses a CFS quota under 1 ms
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")
_ENV_KEY = re.compile(r"[^=\0]+")
STOP_SIGNAL_ANNOTATION = "org.opencontainers.image.stopSignal"  # the image config's StopSignal


@dataclass(frozen=True)
class Volume:
    """A host directory or file bind-mounted into the container."""

    source: str
    destination: str
    read_only: bool = False


@dataclass(frozen=True)
class RunOptions:
    """What ``hako run`` was told; ``None`` / empty means "the image's (or Docker's) default".

    ``entrypoint`` set (even to ``[]``) replaces the image's Entrypoint and drops its Cmd, as
    ``docker run --entrypoint`` does. ``env`` items are ``K=V``, or ``K`` to copy K from the host
    environment (dropped if the host has no K). ``cpus`` is a fraction of CPUs (a CFS quota).
    """

    args: Sequence[str] = ()
    entrypoint: Sequence[str] | None = None
    env: Sequence[str] = ()
    workdir: str | None = None
    user: str | None = None
    terminal: bool = False
    hostname: str | None = None
    memory: int | None = None
    cpus: float | None = None
    pids_limit: int | None = None
    volumes: Sequence[Volume] = ()
    read_only: bool = False
    no_new_privileges: bool = False
    cap_add: Sequence[str] = ()  # capability names (CAP_ optional, any case) or ALL
    cap_drop: Sequence[str] = ()


def build_spec(
    container_id: str,
    options: RunOptions,
    *,
    image: ImageConfig | None = None,
    base: Mapping[str, Any] | None = None,
    rootfs: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The runtime spec for ``container_id``.

    ``image`` is the image config to start from; ``base`` a bundle's (already validated) spec to
    start from instead. ``rootfs`` is the container's rootfs on the host: it becomes root.path and
    is where user and group names are looked up. ``environ`` (default: ``os.environ``) serves
    ``-e K`` without a value.
    """
    if not _CONTAINER_ID.fullmatch(container_id):
        raise ConfigError(f"invalid container id {container_id!r}: use letters, digits, '_', '.' and '-'")
    environ = os.environ if environ is None else environ
    if base is not None:
        validate_spec(base, "bundle spec")
        spec = _from_bundle(container_id, copy.deepcopy(dict(base)), options, rootfs, environ)
    else:
        spec = _from_image(container_id, image or ImageConfig(), options, rootfs, environ)
    spec["root"]["readonly"] = bool(options.read_only or spec["root"].get("readonly", False))
    if rootfs is not None:
        spec["root"]["path"] = str(rootfs)
    _add_volumes(spec, options.volumes)
    linux = spec.setdefault("linux", {})
    linux["cgroupsPath"] = f"{defaults.CGROUPS_PARENT}/{container_id}"
    _add_resources(linux.setdefault("resources", {}), options)
    validate_spec(spec, "generated spec")
    return spec


def _from_image(
    container_id: str,
    image: ImageConfig,
    options: RunOptions,
    rootfs: Path | None,
    environ: Mapping[str, str],
) -> dict[str, Any]:
    hostname = check_hostname(options.hostname or container_id[:12])
    user = resolve_user(rootfs, options.user or image.user)
    env = ["PATH=" + defaults.DEFAULT_PATH, "HOSTNAME=" + hostname]
    if options.terminal:
        env.append("TERM=xterm")
    env = merge_env(merge_env(env, image.env), _expand_env(options.env, environ))
    caps = capabilities(options.cap_add, options.cap_drop)
    process: dict[str, Any] = {
        "terminal": options.terminal,
        "user": _user_json(user),
        "args": _command(image.entrypoint, image.cmd, options),
        "env": _with_home(env, user),
        "cwd": _cwd(options.workdir or image.working_dir or "/"),
        "capabilities": {"bounding": caps, "effective": list(caps), "permitted": list(caps)},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": defaults.NOFILE_LIMIT, "soft": defaults.NOFILE_LIMIT}],
        "noNewPrivileges": options.no_new_privileges,
    }
    spec: dict[str, Any] = {
        "ociVersion": defaults.OCI_VERSION,
        "process": process,
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": defaults.mounts(),
        "linux": {
            "resources": {"devices": defaults.device_rules()},
            "namespaces": [{"type": kind} for kind in defaults.NAMESPACES],
            "maskedPaths": list(defaults.MASKED_PATHS),
            "readonlyPaths": list(defaults.READONLY_PATHS),
        },
    }
    if image.stop_signal:  # as the image spec's conversion to a runtime config says
        spec["annotations"] = {STOP_SIGNAL_ANNOTATION: image.stop_signal}
    return spec


def capabilities(add: Sequence[str] = (), drop: Sequence[str] = ()) -> list[str]:
    """Docker's default capabilities with ``--cap-add`` and ``--cap-drop`` applied as Docker
    applies them: ALL added is every capability (less those dropped), ALL dropped leaves only
    those added, and a capability both added and dropped is added."""
    added, dropped = normalize_capabilities(add), normalize_capabilities(drop)
    if "ALL" in added:
        return [cap for cap in defaults.ALL_CAPABILITIES if cap not in dropped]
    base = [] if "ALL" in dropped else [cap for cap in defaults.CAPABILITIES if cap not in dropped]
    return base + [cap for cap in added if cap not in base]


def normalize_capabilities(names: Sequence[str]) -> list[str]:
    """``net_admin``, ``CAP_NET_ADMIN`` -> ``CAP_NET_ADMIN``; ``all`` -> ``ALL``. ConfigError for
    a name Linux does not know."""
    result = []
    for name in names:
        upper = name.strip().upper()
        cap = upper if upper == "ALL" or upper.startswith("CAP_") else f"CAP_{upper}"
        if cap != "ALL" and cap not in defaults.ALL_CAPABILITIES:
            raise ConfigError(f"unknown capability {name!r}: use a name such as NET_ADMIN, or ALL")
        if cap not in result:
            result.append(cap)
    return result


def stop_signal(spec: Mapping[str, Any]) -> str | None:
    """The signal that stops the container gracefully (`hako stop`), if its image names one."""
    value = (spec.get("annotations") or {}).get(STOP_SIGNAL_ANNOTATION)
    return value if isinstance(value, str) and value else None


def _from_bundle(
    container_id: str,
    spec: dict[str, Any],
    options: RunOptions,
    rootfs: Path | None,
    environ: Mapping[str, str],
) -> dict[str, Any]:
    process = spec["process"]
    process["args"] = _command(None, tuple(process["args"]), options)
    if options.user:
        user = resolve_user(rootfs, options.user)
        process["user"] = _user_json(user)
    else:
        user = resolve_user(rootfs, str(process["user"]["uid"]))  # for HOME only; the spec's ids stay
    env = merge_env(process.get("env") or [], _expand_env(options.env, environ))
    if options.terminal and not any(item.startswith("TERM=") for item in env):
        env.append("TERM=xterm")
    process["env"] = _with_home(env, user)
    if options.workdir:
        process["cwd"] = _cwd(options.workdir)
    process["terminal"] = options.terminal
    process["noNewPrivileges"] = bool(options.no_new_privileges or process.get("noNewPrivileges", False))
    if options.hostname or not spec.get("hostname"):
        spec["hostname"] = check_hostname(options.hostname or container_id[:12])
    linux = spec.setdefault("linux", {})
    # The guest's network namespace is the container's: the VM is the network boundary.
    linux["namespaces"] = [ns for ns in linux.get("namespaces") or [] if ns.get("type") != "network"]
    return spec


def merge_env(env: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """``env`` with each ``K=V`` of ``overrides`` replacing K in place or appended; later wins."""
    merged: dict[str, str] = {}
    for item in [*env, *overrides]:
        key, _, _ = item.partition("=")
        merged[key] = item
    return list(merged.values())


def _expand_env(items: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    result = []
    for item in items:
        key, has_value, _ = item.partition("=")
        if not _ENV_KEY.fullmatch(key):
            raise ConfigError(f"invalid environment variable {item!r}: expected KEY=VALUE or KEY")
        if has_value:
            result.append(item)
        elif key in environ:
            result.append(f"{key}={environ[key]}")
    return result


def _with_home(env: list[str], user: ExecUser) -> list[str]:
    if not any(item.startswith("HOME=") for item in env):
        env = [*env, f"HOME={user.home}"]
    return env


def _command(entrypoint: Sequence[str] | None, cmd: Sequence[str] | None, options: RunOptions) -> list[str]:
    if options.entrypoint is not None:
        args = [*options.entrypoint, *options.args]
    else:
        args = [*(entrypoint or ()), *(options.args or cmd or ())]
    if not args:
        raise ConfigError(
            "no command specified: the image has no Entrypoint or Cmd; give one after the image"
        )
    return args


def _cwd(path: str) -> str:
    if not path.startswith("/"):
        raise ConfigError(f"working directory {path!r} must be an absolute path")
    return _clean(path)


def _clean(path: str) -> str:
    """Normalise an absolute container path ("/a//b/../c/" -> "/a/c")."""
    return "/" + posixpath.normpath(path).lstrip("/")


def check_hostname(name: str) -> str:
    if not _HOSTNAME.fullmatch(name):
        raise ConfigError(f"invalid hostname {name!r}: use up to 64 letters, digits, '-' and '.'")
    return name


def _user_json(user: ExecUser) -> dict[str, Any]:
    result: dict[str, Any] = {"uid": user.uid, "gid": user.gid}
    if user.additional_gids:
        result["additionalGids"] = list(user.additional_gids)
    return result


def _add_volumes(spec: dict[str, Any], volumes: Sequence[Volume]) -> None:
    destinations: dict[str, int] = {}
    for i, volume in enumerate(volumes):
        if not volume.source.startswith("/"):
            raise ConfigError(f"volume source {volume.source!r} must be an absolute host path")
        if not volume.destination.startswith("/"):
            raise ConfigError(f"volume destination {volume.destination!r} must be an absolute path")
        destination = _clean(volume.destination)
        if destination == "/":
            raise ConfigError(f"volume {volume.source}:{volume.destination}: cannot mount over /")
        if destination in destinations:
            raise ConfigError(f"duplicate volume destination {destination}")
        destinations[destination] = i
    if not destinations:
        return
    # A volume replaces a default mount at the same place, as in Docker.
    mounts = [m for m in spec.get("mounts") or [] if _clean(m["destination"]) not in destinations]
    for destination, i in destinations.items():
        volume = volumes[i]
        mounts.append(
            {
                "destination": destination,
                "type": "bind",
                "source": volume.source,
                "options": ["rbind", "rprivate", "ro" if volume.read_only else "rw"],
            }
        )
    spec["mounts"] = mounts


def _add_resources(resources: dict[str, Any], options: RunOptions) -> None:
    if options.memory is not None:
        if options.memory < MIN_MEMORY:
            raise ConfigError(
                f"memory limit {options.memory} is too small; the minimum is 6MiB ({MIN_MEMORY})"
            )
        resources["memory"] = {**resources.get("memory", {}), "limit": options.memory}
    if options.cpus is not None:
        quota = round(options.cpus * defaults.CPU_PERIOD)
        if quota < MIN_CPU_QUOTA:
            raise ConfigError(f"cpus must be at least 0.01, got {options.cpus}")
        resources["cpu"] = {**resources.get("cpu", {}), "quota": quota, "period": defaults.CPU_PERIOD}
    if options.pids_limit is not None:
        if options.pids_limit <= 0:
            raise ConfigError(f"pids limit must be a positive number, got {options.pids_limit}")
        resources["pids"] = {"limit": options.pids_limit}
