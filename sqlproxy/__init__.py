"""sqlproxy: a transparent PostgreSQL proxy that profiles the traffic of any application."""

__version__ = "0.1.0"
