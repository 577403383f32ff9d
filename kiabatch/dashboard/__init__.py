"""``kiabatch dashboard``: a live web view of everything kiabatch knows, and Prometheus metrics.

* :mod:`.data` reads what the pages show from Redis and the backends, with bounded
  cost (no web code; usable from Python);
* :mod:`.metrics` is the Prometheus collector behind ``/metrics``;
* :mod:`.app` is the Starlette application (pages, downloads, actions, auth);
* :mod:`.server` serves it with uvicorn until Ctrl-C.

Only ``kiabatch dashboard`` imports this package: no other command loads the web stack.
"""
