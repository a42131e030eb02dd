"""Build script: the package is pure Python; csrc/ extensions are added by hope_build when possible."""
from setuptools import setup

try:
    from csrc.build import extension_modules_and_cmdclass
except ImportError:  # csrc/build.py missing in a partial checkout
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = extension_modules_and_cmdclass()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
