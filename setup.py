"""Build hook: compile the project's .proto files, and containerd's, with grpcio-tools.

Our own .proto files live next to their package (``src/<package>/``) and are
compiled in place. containerd's come from Debian's
``golang-github-containerd-containerd-dev`` (and the cgroups package it depends
on) under /usr/share/gocode/src: they are staged in a temporary tree, without
their gogoproto options, with their import paths moved under ``hako_containerd/`` (protoc derives Python
module names from paths, and ``github.com`` is not a Python name), then
compiled into ``src/hako_containerd/``. Message and service names are not
touched: they are what containerd speaks. Generated files are not committed.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "src"
GOCODE = Path("/usr/share/gocode/src")
CONTAINERD_PROTOS = (
    "github.com/containerd/containerd/runtime/v2/task/shim.proto",
    "github.com/containerd/containerd/api/events/task.proto",
    "github.com/containerd/containerd/api/services/ttrpc/events/v1/events.proto",
    "github.com/containerd/containerd/pkg/runtimeoptions/v1/api.proto",
    "github.com/containerd/cgroups/stats/v1/metrics.proto",
    "github.com/containerd/cgroups/v2/stats/metrics.proto",
)
PATH_PREFIXES = (
    ("github.com/containerd/containerd/", "hako_containerd/containerd/"),
    ("github.com/containerd/cgroups/", "hako_containerd/cgroups/"),
)
IMPORT = re.compile(r'^(\s*import\s+(?:weak\s+|public\s+)?)"([^"]+)";', re.MULTILINE)
# gogoproto's options steer Go code generation only. They are dropped rather than compiled:
# other Python packages (the CRI API's) register their own gogo.proto in protobuf's default
# pool, and two files defining the same extensions cannot live in one process.
GOGO_IMPORT = re.compile(
    r'^\s*import\s+(?:weak\s+|public\s+)?"[^"]*gogoproto/gogo\.proto";[^\n]*\n', re.MULTILINE
)
GOGO_OPTION_LINE = re.compile(r"^\s*option\s+\(gogoproto\.\w+\)\s*=\s*[^;]+;[^\n]*\n", re.MULTILINE)
GOGO_FIELD_OPTION = re.compile(r'\(gogoproto\.\w+\)\s*=\s*(?:"(?:[^"\\]|\\.)*"|[\w.]+)')
EMPTY_OPTIONS = re.compile(r"\s*\[[\s,]*\]")


def strip_gogo(text: str) -> str:
    text = GOGO_OPTION_LINE.sub("", GOGO_IMPORT.sub("", text))
    text = GOGO_FIELD_OPTION.sub("", text)
    text = re.sub(r"\[\s*,[\s,]*", "[", text)
    text = re.sub(r",[\s,]*\]", "]", text)
    text = re.sub(r",\s*,", ",", text)
    return EMPTY_OPTIONS.sub("", text)


def _protoc(include: Path, *args: str) -> None:
    from grpc_tools import protoc  # build-time dependency (pyproject [build-system])

    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    rc = protoc.main(["grpc_tools.protoc", f"-I{include}", f"-I{well_known}", *args])
    if rc != 0:
        raise SystemExit(f"protoc failed on {args[-1]}")


def compile_own() -> None:
    for proto in sorted(SRC.glob("hako*/**/*.proto")):
        if "hako_containerd" in proto.parts:
            continue
        relative = str(proto.relative_to(SRC))
        _protoc(SRC, f"--python_out={SRC}", f"--pyi_out={SRC}", relative)


def _staged_path(path: str) -> str:
    for old, new in PATH_PREFIXES:
        if path.startswith(old):
            return new + path[len(old) :]
    return path


def compile_containerd() -> None:
    if not (GOCODE / CONTAINERD_PROTOS[0]).exists():
        print(
            "warning: containerd's .proto files are missing (apt-get install "
            "golang-github-containerd-containerd-dev); "
            "containerd-shim-hako-v2 will not work",
            file=sys.stderr,
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        todo, staged = list(CONTAINERD_PROTOS), []
        while todo:
            path = todo.pop()
            target = _staged_path(path)
            if path.startswith("google/protobuf/") or target in staged:
                continue
            text = strip_gogo((GOCODE / path).read_text())
            if "gogoproto" in text:
                raise SystemExit(f"{path}: a gogoproto option was left after stripping them")
            todo += [match.group(2) for match in IMPORT.finditer(text)]
            text = IMPORT.sub(lambda m: f'{m.group(1)}"{_staged_path(m.group(2))}";', text)
            (stage / target).parent.mkdir(parents=True, exist_ok=True)
            (stage / target).write_text(text)
            staged.append(target)
        for target in sorted(staged):
            _protoc(stage, f"--python_out={SRC}", f"--pyi_out={SRC}", target)


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        compile_own()
        compile_containerd()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
