"""The one build step pyproject.toml cannot declare: generate the gRPC stubs before building.

`build_py` runs `service/api/proto_build.py` (loaded by path: nothing of the project is importable yet) so
that wheels, installs from an sdist and editable installs all carry `service/api/_proto/`, generated from
`proto/` and never hand-edited. Needs grpcio-tools at build time (pyproject.toml [build-system] requires).
Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _proto_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_ldm_proto_build", HERE / "service" / "api" / "proto_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithStubs(build_py):
    """build_py that first (re)generates the gRPC stubs and adds their packages."""

    def run(self) -> None:
        proto_build = _proto_build()
        proto_build.ensure()
        self.packages = list(self.packages or [])
        self.packages += [p for p in proto_build.packages() if p not in self.packages]
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
