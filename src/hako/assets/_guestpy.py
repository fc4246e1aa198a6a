"""Helper run by the guest's Python version (Debian's /usr/bin/python3.11), not by hako's interpreter.

It must import nothing but the standard library. Two commands, each reading a JSON job from stdin
and writing a JSON answer to stdout:

``find``: {"path": [...], "modules": [...], "excludes": [...]} -> {"files": {module: file or null},
    "errors": {module: message}}: modulefinder's closure of ``modules`` searched only in ``path``.
``compile``: {"jobs": [[source, pyc, shown_name, optimize], ...]} -> {"errors": [...]}: bytecode with
    ``unchecked-hash`` invalidation, so the guest never checks sources.
"""

from __future__ import annotations

import json
import modulefinder
import py_compile
import sys
from typing import Any


def find(job: dict[str, Any]) -> dict[str, Any]:
    finder = modulefinder.ModuleFinder(path=job["path"], excludes=job["excludes"])
    errors: dict[str, str] = {}
    for name in job["modules"]:
        try:
            finder.import_hook(name)
        except Exception as e:  # reported per module: a SyntaxError, a namespace package, ...
            errors[name] = f"{type(e).__name__}: {e}"
    files = {name: getattr(mod, "__file__", None) for name, mod in finder.modules.items()}
    return {"files": files, "errors": errors}


def compile_all(job: dict[str, Any]) -> dict[str, Any]:
    errors = []
    for source, pyc, shown, optimize in job["jobs"]:
        try:
            py_compile.compile(
                source,
                cfile=pyc,
                dfile=shown,
                doraise=True,
                optimize=optimize,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        except py_compile.PyCompileError as e:
            errors.append(f"{shown}: {e.exc_type_name}: {e.exc_value}")
    return {"errors": errors}


def main() -> None:
    job = json.load(sys.stdin)
    answer = find(job) if sys.argv[1] == "find" else compile_all(job)
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
