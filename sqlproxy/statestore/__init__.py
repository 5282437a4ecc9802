"""Where the durable state lives: a SQLite file (one instance), or a PostgreSQL database shared
by a fleet of instances; and how the fleet's state is merged into one view.

``base`` (the ``StateStore`` protocol and status), ``sqlite`` and ``postgres`` (the two stores),
``merge`` and ``view`` (pure: merging instances' state), ``backoff`` (pure: retry delays).
"""
