"""The shim's TOML configuration: parsing, validation, where it is read from (no root, no VM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hako.errors import ConfigError, HakoError
from hako.shim import config
from hako.shim.config import ShimConfig, load, parse

FULL = """
[hypervisor]
kernel = "debian"
image = "erofs"
memory_mib = 512
vcpus = 2
accel = "tcg"

[runtime]
debug = true
boot_timeout = 90.5
"""


@pytest.fixture(autouse=True)
def no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Neither the real /etc/hako/hako.toml nor the caller's $HAKO_CONFIG leak into a test."""
    monkeypatch.delenv("HAKO_CONFIG", raising=False)
    default = tmp_path / "etc" / "hako.toml"
    monkeypatch.setattr(config, "DEFAULT_PATH", default)
    return default


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_every_key_is_read() -> None:
    cfg = parse(FULL, "test.toml")
    assert cfg == ShimConfig(
        kernel="debian",
        image="erofs",
        memory_mib=512,
        vcpus=2,
        accel="tcg",
        debug=True,
        boot_timeout=90.5,
        source="test.toml",
    )


def test_missing_keys_keep_their_defaults() -> None:
    cfg = parse("[hypervisor]\nvcpus = 4\n", "x.toml")
    assert cfg.vcpus == 4
    assert (cfg.kernel, cfg.image, cfg.memory_mib, cfg.accel) == ("trimmed", None, 256, "auto")
    assert (cfg.debug, cfg.boot_timeout) == (False, 60.0)
    assert parse("", "empty.toml") == ShimConfig(source="empty.toml")


def test_an_integer_boot_timeout_is_accepted() -> None:
    assert parse("[runtime]\nboot_timeout = 30\n", "x").boot_timeout == 30


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[hypervisor\nkernel = 1", r"bad\.toml: invalid TOML"),
        ('kernel = "trimmed"\n', r"unknown section \[kernel\]; use hypervisor, runtime"),
        ("[network]\nmtu = 1500\n", r"unknown section \[network\]"),
        ("[hypervisor]\nmemory = 512\n", r"unknown key 'memory' in \[hypervisor\]; use kernel, image"),
        ("[runtime]\nmemory_mib = 512\n", r"unknown key 'memory_mib' in \[runtime\]"),
        ('[hypervisor]\nmemory_mib = "512"\n', r"\[hypervisor\] memory_mib has the wrong type: '512'"),
        ("[hypervisor]\nvcpus = 1.5\n", r"\[hypervisor\] vcpus has the wrong type: 1\.5"),
        ("[hypervisor]\nvcpus = true\n", r"\[hypervisor\] vcpus has the wrong type: True"),
        ('[runtime]\ndebug = "yes"\n', r"\[runtime\] debug has the wrong type: 'yes'"),
        ('[runtime]\nboot_timeout = "60s"\n', r"\[runtime\] boot_timeout has the wrong type"),
        ("[runtime]\nboot_timeout = true\n", r"\[runtime\] boot_timeout has the wrong type: True"),
        ('[hypervisor]\nkernel = "ubuntu"\n', r"\[hypervisor\] kernel = 'ubuntu'; use trimmed, debian"),
        ('[hypervisor]\nimage = "qcow2"\n', r"image = 'qcow2'; use initramfs, erofs"),
        ('[hypervisor]\naccel = "hvf"\n', r"accel = 'hvf'; use auto, kvm, tcg"),
        ("[hypervisor]\nmemory_mib = 64\n", r"memory_mib must be at least 128"),
        ("[hypervisor]\nvcpus = 0\n", r"vcpus must be at least 1"),
        ("[runtime]\nboot_timeout = 0\n", r"boot_timeout must be more than 0"),
        ("[runtime]\nboot_timeout = -5.0\n", r"boot_timeout must be more than 0"),
    ],
)
def test_bad_files_are_config_errors_naming_the_file(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse(text, "bad.toml")
    assert str(info.value).startswith("bad.toml: ")
    assert isinstance(info.value, HakoError) and info.value.exit_code == 125


def test_the_smallest_allowed_values_pass() -> None:
    cfg = parse("[hypervisor]\nmemory_mib = 128\nvcpus = 1\n", "x")
    assert (cfg.memory_mib, cfg.vcpus) == (128, 1)


# -- where the file comes from ------------------------------------------------------------------


def test_no_file_anywhere_gives_the_defaults() -> None:
    assert load() == ShimConfig(source="defaults")
    assert load(None).source == "defaults"


def test_the_default_file_is_read_when_present(no_ambient_config: Path) -> None:
    _write(no_ambient_config, "[hypervisor]\nvcpus = 3\n")
    cfg = load()
    assert cfg.vcpus == 3
    assert cfg.source == str(no_ambient_config)


def test_hako_config_beats_the_default_file(
    no_ambient_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(no_ambient_config, "[hypervisor]\nvcpus = 3\n")
    env = _write(tmp_path / "env.toml", "[hypervisor]\nvcpus = 5\n")
    monkeypatch.setenv("HAKO_CONFIG", str(env))
    cfg = load()
    assert (cfg.vcpus, cfg.source) == (5, str(env))


def test_an_empty_hako_config_is_ignored(no_ambient_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(no_ambient_config, "[hypervisor]\nvcpus = 3\n")
    monkeypatch.setenv("HAKO_CONFIG", "")
    assert load().vcpus == 3


def test_the_runtime_options_config_path_beats_everything(
    no_ambient_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(no_ambient_config, "[hypervisor]\nvcpus = 3\n")
    monkeypatch.setenv("HAKO_CONFIG", str(_write(tmp_path / "env.toml", "[hypervisor]\nvcpus = 5\n")))
    options = _write(tmp_path / "options.toml", '[hypervisor]\nvcpus = 7\nkernel = "debian"\n')
    cfg = load(str(options))
    assert (cfg.vcpus, cfg.kernel, cfg.source) == (7, "debian", str(options))
    assert load("").vcpus == 5  # an empty ConfigPath is no ConfigPath


def test_a_chosen_file_that_cannot_be_read_is_an_error_not_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"cannot read the hako config {missing}: No such file"):
        load(str(missing))
    monkeypatch.setenv("HAKO_CONFIG", str(missing))
    with pytest.raises(ConfigError, match="cannot read the hako config"):
        load()
    with pytest.raises(ConfigError, match="cannot read the hako config .*: Is a directory"):
        load(str(tmp_path))


def test_a_bad_file_reports_its_path(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.toml", "[hypervisor]\nvcpus = 0\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: \[hypervisor\] vcpus must be at least 1$"):
        load(str(bad))
