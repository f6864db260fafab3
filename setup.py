"""Only here because cffi_modules has no pyproject.toml key; all metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder"])
