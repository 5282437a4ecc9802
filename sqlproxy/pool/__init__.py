"""Server-connection pooling: the pure parts (no I/O). See docs/pooling.md."""
