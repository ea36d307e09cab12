"""Running regions on OpenLambda: wire frames, the deployed handler, the executor, a local worker.

The handler runs inside OpenLambda sandboxes (lampy's source travels in the deploy tarball); the
executor, deploy and the worker run on the caller's machine.
"""
