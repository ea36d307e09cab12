"""Running regions on OpenLambda: wire frames, the deployed handler, the executor, a local worker.

Only `frames` and `handler` (and the core modules they import) travel inside the deploy tarball;
the rest runs on the caller's machine.
"""
