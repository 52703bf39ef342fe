"""Shared test code, importable as ``support`` (pytest puts ``tests/`` on the path).

- ``services``: where the shared servers are; ``require_service`` skips on a laptop, fails in CI.
- ``waiting``: ``wait_until`` / ``await_until`` with a generous ``WAIT``; never a speed expectation.
- ``workers``: ``running_worker``, a worker beside the test.
- ``recording``: ``Recorder``, the ``Events`` middleware, ``FileRecord`` across processes.
- ``deployment``: ``Deployment``, a broker + backend + lock of harnesses, with cleanup.
- ``harnesses``: one ``Harness`` per driver, ``HARNESSES`` and ``DEPLOYMENTS``.
- ``procs`` / ``processes``: helper processes (``python -m support.procs MODE CONFIG_JSON``).
- ``fixtures``: the fixtures (a pytest plugin loaded by tests/conftest.py).
"""
