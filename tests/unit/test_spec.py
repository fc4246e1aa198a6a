"""Building the OCI runtime spec from an image config (or a bundle) and run options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hako.errors import ConfigError
from hako.image.config import ImageConfig
from hako.oci import defaults
from hako.oci.spec import RunOptions, Volume, build_spec, capabilities, merge_env, stop_signal
from hako.oci.users import ExecUser, resolve_user

BUSYBOX = ImageConfig(cmd=("sh",), env=("PATH=/usr/sbin:/usr/bin:/sbin:/bin",))
APP = ImageConfig(
    entrypoint=("/bin/app",), cmd=("--serve",), env=("PATH=/opt/bin", "A=1", "B=2"), working_dir="/data"
)
PASSWD = """root:x:0:0:root:/root:/bin/sh
# a comment
app:x:1000:1000:App:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
broken line
"""
GROUP = """root:x:0:
app:x:1000:
staff:x:50:app,other
audio:x:29:app
nogroup:x:65534:
"""


def spec(options: RunOptions | None = None, image: ImageConfig = BUSYBOX, **kw: Any) -> dict[str, Any]:
    return build_spec("c0ffee0123456789", options or RunOptions(), image=image, **kw)


def env_of(result: dict[str, Any]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in result["process"]["env"])


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


def test_defaults_are_dockers_and_runcs() -> None:
    result = spec()
    process = result["process"]
    assert result["ociVersion"] == "1.0.2"
    assert process["args"] == ["sh"]
    assert process["cwd"] == "/"
    assert process["terminal"] is False
    assert process["user"] == {"uid": 0, "gid": 0}
    assert process["noNewPrivileges"] is False
    assert process["env"] == [
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "HOSTNAME=c0ffee012345",
        "HOME=/",
    ]
    caps = process["capabilities"]
    assert caps["bounding"] == caps["effective"] == caps["permitted"] == list(defaults.CAPABILITIES)
    assert "CAP_SYS_ADMIN" not in caps["bounding"]
    assert "inheritable" not in caps and "ambient" not in caps
    assert process["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576}]
    assert result["hostname"] == "c0ffee012345"
    assert result["root"] == {"path": "rootfs", "readonly": False}
    assert [m["destination"] for m in result["mounts"]] == [
        "/proc",
        "/dev",
        "/dev/pts",
        "/dev/shm",
        "/dev/mqueue",
        "/sys",
        "/sys/fs/cgroup",
    ]
    dev = result["mounts"][1]
    assert dev["options"] == ["nosuid", "strictatime", "mode=755", "size=65536k"]
    pts = result["mounts"][2]
    assert {"newinstance", "ptmxmode=0666", "mode=0620", "gid=5"} <= set(pts["options"])
    assert "ro" in result["mounts"][5]["options"] and "ro" in result["mounts"][6]["options"]
    linux = result["linux"]
    assert [ns["type"] for ns in linux["namespaces"]] == ["pid", "ipc", "uts", "mount", "cgroup"]
    assert "/proc/kcore" in linux["maskedPaths"]
    assert "/proc/sys" in linux["readonlyPaths"]
    assert linux["cgroupsPath"] == "/hako/c0ffee0123456789"
    assert linux["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    assert "memory" not in linux["resources"]
    json.dumps(result)  # serialises as config.json


def test_terminal_sets_term() -> None:
    result = spec(RunOptions(terminal=True, hostname="box"))
    assert result["process"]["terminal"] is True
    assert env_of(result)["TERM"] == "xterm"
    assert env_of(result)["HOSTNAME"] == "box"
    assert result["hostname"] == "box"


def test_env_merge_later_wins_and_host_passthrough() -> None:
    options = RunOptions(env=["B=3", "PASSED", "ABSENT", "PATH=/mine", "E="])
    result = spec(options, image=APP, environ={"PASSED": "from host"})
    assert result["process"]["env"] == [
        "PATH=/mine",
        "HOSTNAME=c0ffee012345",
        "A=1",
        "B=3",
        "PASSED=from host",
        "E=",
        "HOME=/",
    ]


def test_merge_env_replaces_in_place() -> None:
    assert merge_env(["A=1", "B=2"], ["A=3", "C=4"]) == ["A=3", "B=2", "C=4"]


@pytest.mark.parametrize("item", ["=x", ""])
def test_invalid_env_is_refused(item: str) -> None:
    with pytest.raises(ConfigError, match="invalid environment variable"):
        spec(RunOptions(env=[item]))


def test_entrypoint_and_cmd() -> None:
    assert spec(image=APP)["process"]["args"] == ["/bin/app", "--serve"]
    assert spec(RunOptions(args=["--debug"]), image=APP)["process"]["args"] == ["/bin/app", "--debug"]
    # --entrypoint replaces the image's and drops its Cmd, as in Docker.
    assert spec(RunOptions(entrypoint=["/bin/sh"]), image=APP)["process"]["args"] == ["/bin/sh"]
    assert spec(RunOptions(entrypoint=["/bin/sh"], args=["-c", "id"]), image=APP)["process"]["args"] == [
        "/bin/sh",
        "-c",
        "id",
    ]
    assert spec(RunOptions(entrypoint=[], args=["ls"]), image=APP)["process"]["args"] == ["ls"]


def test_no_command_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no command specified"):
        spec(image=ImageConfig())
    with pytest.raises(ConfigError, match="no command specified"):
        spec(RunOptions(entrypoint=[]), image=APP)


def test_workdir() -> None:
    assert spec(image=APP)["process"]["cwd"] == "/data"
    assert spec(RunOptions(workdir="/srv//www/"), image=APP)["process"]["cwd"] == "/srv/www"
    with pytest.raises(ConfigError, match="must be an absolute path"):
        spec(RunOptions(workdir="tmp"))


def test_user_by_name_uses_passwd_and_groups(rootfs: Path) -> None:
    result = spec(RunOptions(user="app"), rootfs=rootfs)
    assert result["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [50, 29]}
    assert env_of(result)["HOME"] == "/home/app"
    assert result["root"]["path"] == str(rootfs)


def test_user_forms(rootfs: Path) -> None:
    assert resolve_user(rootfs, None) == ExecUser(0, 0, (), "/root")
    assert resolve_user(rootfs, "nobody") == ExecUser(65534, 65534, (), "/nonexistent")
    assert resolve_user(rootfs, "1000") == ExecUser(1000, 1000, (50, 29), "/home/app")
    assert resolve_user(rootfs, "4242") == ExecUser(4242, 0, (), "/")
    assert resolve_user(rootfs, "4242:4343") == ExecUser(4242, 4343, (), "/")
    # An explicit group replaces the primary group and drops the supplementary ones.
    assert resolve_user(rootfs, "app:staff") == ExecUser(1000, 50, (), "/home/app")
    assert resolve_user(rootfs, "app:7") == ExecUser(1000, 7, (), "/home/app")
    assert resolve_user(None, "12:34") == ExecUser(12, 34, (), "/")


def test_image_user_is_the_default(rootfs: Path) -> None:
    image = ImageConfig(cmd=("sh",), user="nobody")
    assert spec(image=image, rootfs=rootfs)["process"]["user"] == {"uid": 65534, "gid": 65534}
    assert spec(RunOptions(user="0"), image=image, rootfs=rootfs)["process"]["user"] == {"uid": 0, "gid": 0}


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("ghost", "unable to find user ghost: no matching entries in passwd file"),
        ("app:ghosts", "unable to find group ghosts: no matching entries in group file"),
        ("app:", "invalid user"),
        ("99999999999", "out of range"),
    ],
)
def test_user_errors(rootfs: Path, user: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        spec(RunOptions(user=user), rootfs=rootfs)


def test_user_name_without_an_image_passwd(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the image has no /etc/passwd"):
        resolve_user(tmp_path, "app")
    with pytest.raises(ConfigError, match="unable to find user app"):
        resolve_user(None, "app")


def test_passwd_symlink_is_resolved_inside_the_rootfs(tmp_path: Path) -> None:
    host = tmp_path / "host-etc"
    host.mkdir()
    (host / "passwd").write_text("hostonly:x:4000:4000::/:/bin/sh\n")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").symlink_to(host / "passwd")  # absolute: means <rootfs>/<host>/passwd
    with pytest.raises(ConfigError, match="no /etc/passwd"):
        resolve_user(root, "hostonly")
    inside = root / str(host).lstrip("/")
    inside.mkdir(parents=True)
    (inside / "passwd").write_text("inside:x:4001:4001::/in:/bin/sh\n")
    assert resolve_user(root, "inside") == ExecUser(4001, 4001, (), "/in")


def test_passwd_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc" / "passwd").mkdir(parents=True)
    with pytest.raises(ConfigError, match="not a regular file"):
        resolve_user(root, "app")


def test_resources() -> None:
    options = RunOptions(memory=256 * 1024 * 1024, cpus=1.5, pids_limit=100)
    resources = spec(options)["linux"]["resources"]
    assert resources["memory"] == {"limit": 268435456}
    assert resources["cpu"] == {"quota": 150000, "period": 100000}
    assert resources["pids"] == {"limit": 100}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (RunOptions(memory=1024), "memory limit 1024 is too small"),
        (RunOptions(cpus=0.001), "cpus must be at least 0.01"),
        (RunOptions(pids_limit=0), "pids limit must be a positive number"),
        (RunOptions(hostname="bad host"), "invalid hostname"),
    ],
)
def test_option_errors(options: RunOptions, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        spec(options)


def test_invalid_container_id() -> None:
    with pytest.raises(ConfigError, match="invalid container id"):
        build_spec("../escape", RunOptions(), image=BUSYBOX)


def test_volumes_and_read_only_rootfs() -> None:
    options = RunOptions(
        volumes=[Volume("/srv/data", "/data", read_only=True), Volume("/srv/shm", "/dev/shm/")],
        read_only=True,
        no_new_privileges=True,
    )
    result = spec(options)
    assert result["root"]["readonly"] is True
    assert result["process"]["noNewPrivileges"] is True
    mounts = {m["destination"]: m for m in result["mounts"]}
    assert mounts["/data"] == {
        "destination": "/data",
        "type": "bind",
        "source": "/srv/data",
        "options": ["rbind", "rprivate", "ro"],
    }
    assert mounts["/dev/shm"]["source"] == "/srv/shm"  # replaces the default /dev/shm tmpfs
    assert mounts["/dev/shm"]["options"][-1] == "rw"
    assert len(result["mounts"]) == len(defaults.mounts()) + 1


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        (Volume("relative", "/data"), "must be an absolute host path"),
        (Volume("/srv", "data"), "must be an absolute path"),
        (Volume("/srv", "/"), "cannot mount over /"),
    ],
)
def test_volume_errors(volume: Volume, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        spec(RunOptions(volumes=[volume]))


def test_duplicate_volume_destination() -> None:
    with pytest.raises(ConfigError, match="duplicate volume destination /data"):
        spec(RunOptions(volumes=[Volume("/a", "/data"), Volume("/b", "/data/")]))


def _bundle_spec() -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": True,
            "user": {"uid": 1000, "gid": 1000},
            "args": ["sleep", "10"],
            "env": ["PATH=/bin", "X=1"],
            "cwd": "/work",
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "bundled",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}],
            "resources": {"memory": {"limit": 999999999}},
        },
    }


def test_bundle_spec_is_the_base(rootfs: Path) -> None:
    base = _bundle_spec()
    result = build_spec("ctr", RunOptions(), base=base, rootfs=rootfs)
    process = result["process"]
    assert process["args"] == ["sleep", "10"]
    assert process["user"] == {"uid": 1000, "gid": 1000}
    assert process["cwd"] == "/work"
    assert process["terminal"] is False  # the run decides whether there is a terminal
    assert process["noNewPrivileges"] is True
    assert process["env"] == ["PATH=/bin", "X=1", "HOME=/home/app"]
    assert result["hostname"] == "bundled"
    assert result["root"] == {"path": str(rootfs), "readonly": True}
    assert [ns["type"] for ns in result["linux"]["namespaces"]] == ["pid", "mount"]
    assert result["linux"]["cgroupsPath"] == "/hako/ctr"
    assert result["mounts"] == base["mounts"]
    assert base["linux"]["namespaces"][1] == {"type": "network"}  # the base is not modified


def test_bundle_spec_with_overrides(rootfs: Path) -> None:
    options = RunOptions(
        args=["echo", "hi"],
        env=["X=2"],
        workdir="/tmp",
        user="nobody",
        terminal=True,
        hostname="other",
        memory=64 * 1024 * 1024,
        volumes=[Volume("/srv", "/srv")],
    )
    result = build_spec("ctr", options, base=_bundle_spec(), rootfs=rootfs)
    process = result["process"]
    assert process["args"] == ["echo", "hi"]
    assert process["env"] == ["PATH=/bin", "X=2", "TERM=xterm", "HOME=/nonexistent"]
    assert process["cwd"] == "/tmp"
    assert process["user"] == {"uid": 65534, "gid": 65534}
    assert result["hostname"] == "other"
    assert result["linux"]["resources"]["memory"] == {"limit": 64 * 1024 * 1024}
    assert result["mounts"][-1]["source"] == "/srv"


def test_the_images_stop_signal_is_an_annotation_hako_stop_reads() -> None:
    with_signal = spec(image=ImageConfig(cmd=("nginx",), stop_signal="SIGQUIT"))
    assert with_signal["annotations"] == {"org.opencontainers.image.stopSignal": "SIGQUIT"}
    assert stop_signal(with_signal) == "SIGQUIT"
    assert "annotations" not in spec() and stop_signal(spec()) is None


def test_cap_add_and_cap_drop_as_docker_applies_them() -> None:
    default = list(defaults.CAPABILITIES)
    assert capabilities() == default
    assert capabilities(add=["net_admin"], drop=["CAP_MKNOD"]) == [
        *(cap for cap in default if cap != "CAP_MKNOD"),
        "CAP_NET_ADMIN",
    ]
    assert capabilities(drop=["all"], add=["NET_BIND_SERVICE"]) == ["CAP_NET_BIND_SERVICE"]
    every = capabilities(add=["ALL"], drop=["SYS_ADMIN"])
    assert len(every) == len(defaults.ALL_CAPABILITIES) - 1 and "CAP_SYS_ADMIN" not in every
    assert "CAP_KILL" in capabilities(add=["KILL"], drop=["KILL"])  # both: added, as Docker does
    with pytest.raises(ConfigError, match="unknown capability 'NET_FLY'"):
        capabilities(add=["NET_FLY"])
    process = spec(RunOptions(cap_drop=["ALL"], cap_add=["CHOWN"]))["process"]
    assert process["capabilities"] == {k: ["CAP_CHOWN"] for k in ("bounding", "effective", "permitted")}
