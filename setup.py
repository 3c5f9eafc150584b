"""Build glue: everything else lives in pyproject.toml.

Two C builds share the ring core's sources (circuits/ring/csrc), compiled
unchanged into each: the cffi extension for Python, and the LD_PRELOAD
library for unmodified programs (circuits/preload, docs/preload.md).  The
library is built as an Extension so that every install, `pip install -e .`
included, builds it; it is a plain shared object, never imported.
"""
import os
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PRELOAD = "circuits.preload.libcircuits_preload"

preload = Extension(
    PRELOAD,
    sources=sorted(glob("circuits/preload/*.c")) + sorted(glob("circuits/ring/csrc/*.c")),
    depends=glob("circuits/preload/*.h") + glob("circuits/ring/csrc/*.h"),
    include_dirs=["circuits/ring/csrc"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-pthread",
                        "-fvisibility=hidden"],
    extra_link_args=["-pthread", "-ldl"],
)


class BuildExt(build_ext):
    """Name the preload library libcircuits_preload.so (no Python ABI tag):
    it is loaded by the dynamic linker, not imported."""

    def get_ext_filename(self, fullname):
        # distutils asks with the last component only, setuptools with the full name
        if fullname in (PRELOAD, PRELOAD.rsplit(".", 1)[1]):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext):
        return [] if ext.name == PRELOAD else super().get_export_symbols(ext)


setup(cffi_modules=["circuits/ring/_build.py:ffibuilder"], ext_modules=[preload],
      cmdclass={"build_ext": BuildExt})
