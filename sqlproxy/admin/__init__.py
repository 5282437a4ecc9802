"""The admin side: a Starlette app served by uvicorn inside the proxy's own event loop.

JSON API (``api.py``), Prometheus exposition (``metrics.py``), EXPLAIN with advice
(``explain.py``, ``advice.py``), latency history for the dashboard (``history.py``), the
primary's health probe (``probe.py``), and the dashboard page itself (``static/``). Everything
here only *reads* what the proxy and the analysis record; nothing runs on the proxy's hot path.
"""

from sqlproxy.admin.app import create_app
from sqlproxy.admin.server import AdminServer

__all__ = ["AdminServer", "create_app"]
