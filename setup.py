"""Build glue: everything else lives in pyproject.toml."""
from setuptools import setup

setup(cffi_modules=["circuits/ring/_build.py:ffibuilder"])
