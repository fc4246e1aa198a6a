"""OCI spec parsing in the guest agent: typed results, and errors that name the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hako_agent import linux
from hako_agent.errors import InvalidArgument
from hako_agent.spec import (
    CAPABILITIES,
    RLIM_INFINITY,
    RLIMITS,
    cap_mask,
    cap_names,
    check_id,
    parse_exec_process,
    parse_mount_options,
    parse_resources,
    parse_spec,
)

DOCKER_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
]  # fmt: skip


def docker_spec(**overrides: Any) -> dict[str, Any]:
    """Roughly what Docker / containerd generate."""
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [10, 20]},
            "args": ["sh", "-c", "echo hi"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOSTNAME=box"],
            "cwd": "/",
            "capabilities": {name: DOCKER_CAPS for name in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
            "noNewPrivileges": True,
            "oomScoreAdj": 100,
        },
        "root": {"path": "/run/hako/c1/rootfs", "readonly": True},
        "hostname": "box",
        "mounts": [
            {
                "destination": "/proc",
                "type": "proc",
                "source": "proc",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["ro", "nosuid"],
            },
            {
                "destination": "/etc/hosts",
                "type": "bind",
                "source": "/run/hako/hosts",
                "options": ["rbind", "rprivate"],
            },
        ],
        "linux": {
            "resources": {"memory": {"limit": 64 << 20}, "cpu": {"quota": 50000, "period": 100000}},
            "cgroupsPath": "/hako/c1",
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/kcore", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys"],
            "sysctl": {"net.ipv4.ip_forward": "1"},
        },
    }
    spec.update(overrides)
    return spec


def parse(doc: dict[str, Any]) -> Any:
    return parse_spec(json.dumps(doc).encode())


def test_docker_like_spec() -> None:
    spec = parse(docker_spec())
    assert spec.root_path == "/run/hako/c1/rootfs" and spec.root_readonly
    assert spec.hostname == "box"
    p = spec.process
    assert p.args == ["sh", "-c", "echo hi"] and p.cwd == "/" and not p.terminal
    assert (p.user.uid, p.user.gid, p.user.additional_gids) == (1000, 1000, [10, 20])
    assert p.no_new_privileges and p.oom_score_adj == 100
    assert p.capabilities is not None
    assert sorted(cap_names(p.capabilities.bounding)) == sorted(DOCKER_CAPS)
    assert p.capabilities.inheritable == 0 and p.capabilities.ambient == 0
    assert [(r.resource, r.soft, r.hard) for r in p.rlimits] == [(RLIMITS["RLIMIT_NOFILE"], 512, 1024)]
    assert [ns.type for ns in spec.namespaces] == ["pid", "ipc", "uts", "mount"]
    assert spec.masked_paths == ["/proc/kcore", "/sys/firmware"] and spec.readonly_paths == ["/proc/sys"]
    assert spec.cgroups_path == "/hako/c1"
    assert spec.resources.memory_limit == 64 << 20 and spec.resources.cpu_quota == 50000
    assert spec.sysctl == {"net.ipv4.ip_forward": "1"}
    assert spec.rootfs_propagation == linux.MS_SLAVE | linux.MS_REC
    dev = spec.mounts[1]
    assert dev.options.flags == linux.MS_NOSUID | linux.MS_STRICTATIME
    assert dev.options.data == "mode=755,size=65536k"
    hosts = spec.mounts[3]
    assert hosts.options.bind and hosts.options.flags == linux.MS_BIND | linux.MS_REC
    assert hosts.options.propagation == [linux.MS_PRIVATE | linux.MS_REC]


def test_process_path_list_uses_its_own_env() -> None:
    spec = parse(docker_spec())
    assert spec.process.path_list()[:2] == ["/usr/local/sbin", "/usr/local/bin"]
    process = parse_exec_process(json.dumps({"args": ["ls"], "env": ["PATH=/opt::/bin"]}).encode())
    assert process.path_list() == ["/opt", ".", "/bin"]
    assert parse_exec_process(b'{"args": ["ls"]}').path_list()[-1] == "/bin"


@pytest.mark.parametrize(
    ("options", "flags", "data", "propagation"),
    [
        (["nosuid", "mode=755"], linux.MS_NOSUID, "mode=755", []),
        (["ro", "rw"], 0, "", []),
        (["rw", "ro", "nodev", "noexec"], linux.MS_RDONLY | linux.MS_NODEV | linux.MS_NOEXEC, "", []),
        (
            ["rbind", "ro", "rslave"],
            linux.MS_BIND | linux.MS_REC | linux.MS_RDONLY,
            "",
            [linux.MS_SLAVE | linux.MS_REC],
        ),
        (
            ["newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
            0,
            "newinstance,ptmxmode=0666,mode=0620,gid=5",
            [],
        ),
        (["defaults", "tmpcopyup", "relatime", "private"], linux.MS_RELATIME, "", [linux.MS_PRIVATE]),
        (["suid", "dev", "exec", "atime"], 0, "", []),
    ],
)
def test_mount_options(options: list[str], flags: int, data: str, propagation: list[int]) -> None:
    parsed = parse_mount_options(options)
    assert (parsed.flags, parsed.data, parsed.propagation) == (flags, data, propagation)


def test_capability_table() -> None:
    assert CAPABILITIES["CAP_CHOWN"] == 0
    assert CAPABILITIES["CAP_SYS_ADMIN"] == 21
    assert CAPABILITIES["CAP_CHECKPOINT_RESTORE"] == 40
    assert cap_mask(["CAP_KILL", "net_raw"], "x") == (1 << 5) | (1 << 13)
    assert cap_names(cap_mask(["CAP_SETUID"], "x")) == ["CAP_SETUID"]
    with pytest.raises(InvalidArgument, match=r"^x\[1\]: unknown capability 'CAP_NOPE'"):
        cap_mask(["CAP_KILL", "CAP_NOPE"], "x")


def test_rlimit_infinity() -> None:
    doc = docker_spec()
    doc["process"]["rlimits"] = [{"type": "RLIMIT_CORE", "soft": 2**64 - 1, "hard": 2**64 - 1}]
    rlimit = parse(doc).process.rlimits[0]
    assert (rlimit.resource, rlimit.soft, rlimit.hard) == (4, RLIM_INFINITY, RLIM_INFINITY)


def _bad(path: str, value: Any) -> dict[str, Any]:
    doc = docker_spec()
    *parents, last = path.split(".")
    target = doc
    for part in parents:
        target = target[part]
    target[last] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_bad("root.path", "relative/rootfs"), r"^root\.path: must be an absolute path"),
        (_bad("process.args", []), r"^process\.args: must name the program"),
        (_bad("process.args", ["sh", 3]), r"^process\.args\[1\]: must be a string"),
        (_bad("process.cwd", "tmp"), r"^process\.cwd: must be an absolute path"),
        (_bad("process.env", ["NOEQUALS"]), r"^process\.env\[0\]: 'NOEQUALS' is not NAME=value"),
        (_bad("process.user", {"uid": -1}), r"^process\.user\.uid: must be at least 0"),
        (_bad("process.user", {"uid": "0"}), r"^process\.user\.uid: must be an integer"),
        (_bad("process.terminal", "yes"), r"^process\.terminal: must be true or false"),
        (_bad("process.capabilities", {"bounding": ["CAP_FLY"]}), r"^process\.capabilities\.bounding\[0\]"),
        (
            _bad("process.rlimits", [{"type": "RLIMIT_X", "soft": 1, "hard": 1}]),
            r"^process\.rlimits\[0\]\.type",
        ),
        (
            _bad("process.rlimits", [{"type": "RLIMIT_NOFILE", "soft": 9, "hard": 1}]),
            r"^process\.rlimits\[0\]: soft",
        ),
        (
            _bad("mounts", [{"destination": "proc", "type": "proc"}]),
            r"^mounts\[0\]\.destination: must be an abs",
        ),
        (
            _bad("mounts", [{"destination": "/a/../b", "type": "tmpfs"}]),
            r"^mounts\[0\]\.destination: must not",
        ),
        (_bad("mounts", [{"destination": "/x"}]), r"^mounts\[0\]\.type: missing"),
        (
            _bad("mounts", [{"destination": "/x", "options": ["bind"], "source": "y"}]),
            r"^mounts\[0\]\.source",
        ),
        (
            _bad("linux.namespaces", [{"type": "user"}]),
            r"^linux\.namespaces\[0\]\.type: user namespaces are not",
        ),
        (
            _bad("linux.namespaces", [{"type": "pid"}]),
            r"^linux\.namespaces: a new mount namespace is required",
        ),
        (
            _bad("linux.namespaces", [{"type": "mount"}, {"type": "mount"}]),
            r"^linux\.namespaces\[1\]\.type: mount",
        ),
        (_bad("linux.namespaces", [{"type": "mount"}]), r"^hostname: setting it needs a new uts namespace"),
        (_bad("linux.rootfsPropagation", "sideways"), r"^linux\.rootfsPropagation: unknown"),
        (_bad("linux.resources", {"cpu": {"period": 10}}), r"^linux\.resources\.cpu\.period"),
        (
            _bad("linux.resources", {"memory": {"limit": "1G"}}),
            r"^linux\.resources\.memory\.limit: must be an int",
        ),
        (_bad("hostname", "h" * 65), r"^hostname: longer than 64 bytes"),
    ],
)
def test_errors_name_the_field(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse(doc)


def test_not_json() -> None:
    with pytest.raises(InvalidArgument, match=r"^oci_spec: not valid JSON"):
        parse_spec(b"{nope")
    with pytest.raises(InvalidArgument, match=r"^oci_spec: must be an object"):
        parse_spec(b"[]")
    with pytest.raises(InvalidArgument, match=r"^process: missing"):
        parse_spec(b'{"root": {"path": "/r"}}')


def test_exec_process() -> None:
    process = parse_exec_process(
        json.dumps(
            {"args": ["id"], "env": ["A=1"], "cwd": "/tmp", "user": {"uid": 5}, "terminal": True}
        ).encode()
    )
    assert process.args == ["id"] and process.cwd == "/tmp" and process.user.uid == 5 and process.terminal
    assert process.capabilities is None  # not given: left as the agent has them
    with pytest.raises(InvalidArgument, match=r"^process\.args"):
        parse_exec_process(b'{"args": [""]}')


def test_resources() -> None:
    res = parse_resources({"pids": {"limit": 10}, "unified": {"memory.high": "1M"}})
    assert res.pids_limit == 10 and res.unified == {"memory.high": "1M"}
    with pytest.raises(InvalidArgument, match=r"^linux\.resources\.unified: '\.\./x'"):
        parse_resources({"unified": {"../x": "1"}})


@pytest.mark.parametrize("value", ["c1", "a-b_c.d", "A" * 256])
def test_good_ids(value: str) -> None:
    assert check_id(value, "container_id") == value


@pytest.mark.parametrize("value", ["", ".hidden", "a/b", "a b", "..", "A" * 257])
def test_bad_ids(value: str) -> None:
    with pytest.raises(InvalidArgument, match="^container_id: "):
        check_id(value, "container_id")
