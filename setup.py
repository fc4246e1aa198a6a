"""Build hook: compile the project's .proto files with grpcio-tools before packaging.

The generated ``*_pb2.py`` / ``*_pb2.pyi`` files are written next to their .proto
(``src/<package>/``) and are not committed.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "src"


def compile_protos() -> None:
    from grpc_tools import protoc  # build-time dependency (pyproject [build-system])

    include = Path(protoc.__file__).resolve().parent / "_proto"
    protos = sorted(str(p.relative_to(SRC)) for p in SRC.glob("hako*/**/*.proto"))
    for proto in protos:
        args = [f"-I{SRC}", f"-I{include}", f"--python_out={SRC}", f"--pyi_out={SRC}", proto]
        rc = protoc.main(["grpc_tools.protoc", *args])
        if rc != 0:
            raise SystemExit(f"protoc failed on {proto}")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
