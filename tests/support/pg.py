"""The test suite's throwaway PostgreSQL clusters.

The implementation lives in :mod:`sqlproxy.devcluster`, which ``sqlproxy demo`` uses too; this
module keeps the short name the tests and benchmarks import.
"""

from sqlproxy.devcluster import *  # noqa: F403
from sqlproxy.devcluster import __all__ as __all__
from sqlproxy.pghost import _chown_to as _chown_to
