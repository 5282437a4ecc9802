"""Worker processes (``[proxy] workers = N``): N processes share the listen address with
``SO_REUSEPORT``, each running the ordinary runtime (its own event loop and hot path), under a
supervisor that restarts the ones that die, passes signals on and serves the one admin API.

* ``keys``: the worker index inside the cancel secrets the proxy hands out (pure);
* ``limits``: the machine-wide connection counts, in shared memory, touched at connect and
  disconnect only;
* ``control``: each worker's Unix socket, for cancel requests that landed on another worker and
  for the supervisor's questions (its statistics, sessions, backends);
* ``worker``: a worker process's main;
* ``supervisor``: the main process.

With ``workers = 1`` none of this runs: ``sqlproxy serve`` is the single process it always was.
"""
