"""Build hook: compile the hot-path modules with mypyc (they remain valid plain Python).

Set SQLPROXY_NO_MYPYC=1 to install without compiling.
"""

import os

from setuptools import setup

HOT_MODULES = ["sqlproxy/wire/conversation.py"]

ext_modules = []
if not os.environ.get("SQLPROXY_NO_MYPYC"):
    try:
        from mypyc.build import mypycify
    except ImportError:  # pragma: no cover - mypy is a build requirement
        pass
    else:
        ext_modules = mypycify(HOT_MODULES, opt_level="3")

setup(ext_modules=ext_modules)
