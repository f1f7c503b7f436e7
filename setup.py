"""Build step that pyproject.toml cannot express: generate the gRPC stubs from protos/.

The stubs are never committed or hand-edited: every install (wheel or editable) runs
protos/generate.py, the one script that makes them.
"""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    """Run protos/generate.py before collecting modules, so wheels and editable installs get stubs."""

    def run(self) -> None:
        generator = HERE / "protos" / "generate.py"
        if generator.exists():
            runpy.run_path(str(generator))["generate"]()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
