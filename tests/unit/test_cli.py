"""The command line: parsing and one-line errors with Docker's exit codes (no root, no VM)."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.any_pb2 import Any as AnyPb

from hako.cli.options import (
    no_new_privileges,
    parse_cpus,
    parse_memory,
    parse_signal,
    parse_size,
    parse_volume,
    read_env_file,
)
from hako.errors import AgentError, ContainerNotFound, ExecNotExecutable, ExecNotFound, UsageError
from hako.runtime.agent import translate
from hako.runtime.sandboxd import status_of
from hako_api import agent_pb2
from hako_ttrpc import ConnectionClosed, TtrpcError, codes


def test_sizes_use_binary_units() -> None:
    assert parse_size("512m") == 512 << 20
    assert parse_size("1g") == 1 << 30
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("64MiB") == 64 << 20
    assert parse_size("1024") == 1024
    with pytest.raises(UsageError, match="invalid size 'lots'"):
        parse_size("lots")


def test_cpus_and_signals() -> None:
    assert parse_cpus("0.5") == 0.5
    assert parse_cpus("2", host_cpus=2) == 2.0
    with pytest.raises(UsageError, match="this host has 2 CPUs"):
        parse_cpus("2.5", host_cpus=2)
    assert parse_memory("1g", host_bytes=2 << 30) == 1 << 30
    with pytest.raises(UsageError, match="more than this host's memory"):
        parse_memory("3g", host_bytes=2 << 30)
    with pytest.raises(UsageError):
        parse_cpus("0")
    assert parse_signal("KILL") == 9
    assert parse_signal("sigterm") == 15
    assert parse_signal("2") == 2
    with pytest.raises(UsageError, match="invalid signal"):
        parse_signal("NOPE")


def test_volumes() -> None:
    volume = parse_volume("/srv/data:/data:ro")
    assert (volume.source, volume.destination, volume.read_only) == ("/srv/data", "/data", True)
    assert not parse_volume("/a:/b").read_only
    for bad in ("relative:/x", "/a:relative", "/a", "/a:/b:rx"):
        with pytest.raises(UsageError):
            parse_volume(bad)


def _exec_failure(err: int) -> TtrpcError:
    detail = AnyPb()
    detail.Pack(agent_pb2.ExecFailure(errno=err, path="foo", message=f'exec: "foo": {errno.errorcode[err]}'))
    return TtrpcError(codes.FAILED_PRECONDITION, "exec failed", [detail])


def test_agent_errors_become_docker_exit_codes() -> None:
    not_found = translate(_exec_failure(errno.ENOENT), "StartContainer")
    assert isinstance(not_found, ExecNotFound) and not_found.exit_code == 127
    denied = translate(_exec_failure(errno.EACCES), "StartContainer")
    assert isinstance(denied, ExecNotExecutable) and denied.exit_code == 126
    assert isinstance(translate(TtrpcError(codes.NOT_FOUND, "no c1"), "X"), ContainerNotFound)
    lost = translate(ConnectionClosed(), "WaitProcess")
    assert isinstance(lost, AgentError) and lost.code == codes.UNAVAILABLE


def test_exec_failures_survive_the_daemon_hop() -> None:
    """The daemon re-encodes an exec failure; the CLI decodes it to the same exit code."""
    for error, code in ((ExecNotFound("exec: foo: not found"), 127), (ExecNotExecutable("denied"), 126)):
        assert translate(status_of(error), "StartContainer").exit_code == code


def test_an_agent_error_through_the_daemon_names_the_call_once() -> None:
    agent_error = TtrpcError(codes.FAILED_PRECONDITION, "chdir to cwd '/x': No such file")
    first = translate(agent_error, "CreateContainer")
    assert str(first) == "CreateContainer: chdir to cwd '/x': No such file"
    again = translate(status_of(first), "CreateContainer")
    assert str(again) == str(first) and isinstance(again, AgentError)
    assert again.code == codes.FAILED_PRECONDITION


def _hako(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hako.cli.main", *args], capture_output=True, text=True, check=False
    )


def test_bad_flags_exit_125_with_one_line() -> None:
    result = _hako("run", "--nope", "img")
    assert result.returncode == 125
    assert result.stderr.count("\n") == 1 and "unrecognized arguments: --nope" in result.stderr


def test_bad_option_values_exit_125() -> None:
    result = _hako("run", "--accel", "warp", "img", "true")
    assert result.returncode == 125 and "invalid choice: 'warp'" in result.stderr


def test_env_files_as_docker_reads_them(tmp_path: Path) -> None:
    env = tmp_path / "app.env"
    env.write_text("# settings\nA=1\n\n  B=two words\nFROM_HOST\nC=\n")
    assert read_env_file(str(env)) == ["A=1", "B=two words", "FROM_HOST", "C="]
    env.write_text("A=1\n=nokey\n")
    with pytest.raises(UsageError, match="line 2"):
        read_env_file(str(env))
    with pytest.raises(UsageError, match="No such file"):
        read_env_file(str(tmp_path / "missing.env"))


def test_security_opt_knows_no_new_privileges() -> None:
    assert not no_new_privileges([])
    assert no_new_privileges(["no-new-privileges"]) and no_new_privileges(["no-new-privileges:true"])
    assert not no_new_privileges(["no-new-privileges=true", "no-new-privileges:false"])
    for unknown in ("seccomp=unconfined", "no-new-privileges:maybe", "apparmor=x"):
        with pytest.raises(UsageError, match="no-new-privileges"):
            no_new_privileges([unknown])


def test_a_termination_signal_ends_the_command_as_ctrl_c_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM and SIGHUP raise as Ctrl-C does (hako run cleans up), and the exit code is 128 +
    the signal, as a shell reports a command the signal killed."""
    import argparse
    import os
    import signal

    from hako.cli import main as cli_main
    from hako.cli.common import Interrupted, interrupt_on

    previous = signal.getsignal(signal.SIGHUP)
    try:
        interrupt_on((signal.SIGHUP,))
        with pytest.raises(Interrupted) as raised:
            os.kill(os.getpid(), signal.SIGHUP)
        assert raised.value.signum == signal.SIGHUP and isinstance(raised.value, KeyboardInterrupt)
    finally:
        signal.signal(signal.SIGHUP, previous)

    def interrupted(args: argparse.Namespace) -> int:
        raise Interrupted(signal.SIGTERM)

    def ctrl_c(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    for func, code in ((interrupted, 143), (ctrl_c, 130)):
        parser = argparse.ArgumentParser()
        parser.set_defaults(func=func)
        monkeypatch.setattr(cli_main, "build_parser", lambda argv=None, parser=parser: parser)
        with pytest.raises(SystemExit) as exited:
            cli_main.main([])
        assert exited.value.code == code
