"""Build script: the package is pure Python plus optional csrc/ extensions (see docs/kernels/csrc.md)."""
import os
import sys

from setuptools import setup

# pip runs this file from a temp cwd under some frontends: make csrc/ importable from the project root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from csrc.build import extension_modules_and_cmdclass  # noqa: E402

ext_modules, cmdclass = extension_modules_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
