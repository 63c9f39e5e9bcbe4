# Metadata lives in pyproject.toml; this file exists for tools that still call setup.py.
# Nothing is compiled: the kernels are Triton, built at run time.
from setuptools import setup

setup()
