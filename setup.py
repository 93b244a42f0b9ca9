"""Build script for mqstore's Cython extension(s).

Every ``ext/*.pyx`` becomes ``mqstore.<name>``. The generated ``.c`` files are build products and
are not committed. ``MQSTORE_DEBUG=1`` builds with C assertions on, no optimisation, Cython's
bounds and wraparound checks and line tracing, for debugging and coverage.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
DEBUG = os.environ.get("MQSTORE_DEBUG", "") not in ("", "0")


class CythonBuildExt(build_ext):
    """Cythonize from source at build time (so a checkout needs only Python, gcc and pip)."""

    def finalize_options(self) -> None:
        from Cython.Build import cythonize

        directives = {
            "language_level": "3",
            "boundscheck": DEBUG,
            "wraparound": DEBUG,
            "initializedcheck": DEBUG,
            "cdivision": True,
            "embedsignature": True,
        }
        if DEBUG:
            directives["linetrace"] = True
        self.distribution.ext_modules = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
            compile_time_env={"MQSTORE_DEBUG": DEBUG},
            force=DEBUG,
        )
        super().finalize_options()


def extensions() -> list[Extension]:
    macros: list[tuple[str, str | None]] = []
    compile_args = ["-std=c99", "-Wall", "-Wno-unused-function"]
    if DEBUG:
        macros += [("MQSTORE_DEBUG", "1"), ("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
        compile_args += ["-O0", "-g", "-UNDEBUG"]
    else:
        compile_args += ["-O3"]
    out = []
    for pyx in sorted((HERE / "ext").glob("*.pyx")):
        out.append(
            Extension(
                f"mqstore.{pyx.stem}",
                [str(pyx.relative_to(HERE))],
                include_dirs=["ext"],
                define_macros=macros,
                extra_compile_args=compile_args,
                depends=[str(p.relative_to(HERE)) for p in (HERE / "ext").glob("*.h")],
            )
        )
    return out


setup(ext_modules=extensions(), cmdclass={"build_ext": CythonBuildExt})
