"""Build hook: compile the hot-path modules with mypyc (they remain valid plain Python).

Set SQLPROXY_NO_MYPYC=1 to install without compiling.
"""

import os

from setuptools import Extension, setup

# The per-message conversation tracker and the per-statement profiling path (statistics,
# latency sketch, statement cache, pattern detector). The regex-driven normalizer and the
# sqlglot classifier stay interpreted: their time is spent in re and sqlglot, and they run
# once per new text or shape.
HOT_MODULES = [
    "sqlproxy/wire/scan.py",
    "sqlproxy/wire/requests.py",
    "sqlproxy/wire/conversation.py",
    "sqlproxy/analysis/cache.py",
    "sqlproxy/analysis/detector.py",
    "sqlproxy/analysis/findings.py",
    "sqlproxy/analysis/profiler.py",
    "sqlproxy/analysis/sketch.py",
    "sqlproxy/analysis/statement.py",
    "sqlproxy/analysis/stats.py",
    "sqlproxy/proxy/pump.py",
    "sqlproxy/proxy/fastroute.py",
    "sqlproxy/routing/answers.py",
    "sqlproxy/routing/units.py",
    "sqlproxy/proxy/recorder.py",
    "sqlproxy/pool/state.py",
    "sqlproxy/proxy/pinscan.py",
    "sqlproxy/proxy/direct.py",
    "sqlproxy/proxy/fastpool.py",
]

# Non-blocking socket reads and writes for the direct relay (pump.py); always built.
ext_modules = [Extension("sqlproxy.proxy._sockio", ["sqlproxy/proxy/_sockio.c"])]
if not os.environ.get("SQLPROXY_NO_MYPYC"):
    try:
        from mypyc.build import mypycify
    except ImportError:  # pragma: no cover - mypy is a build requirement
        pass
    else:
        ext_modules += mypycify(HOT_MODULES, opt_level="3")

setup(ext_modules=ext_modules)
