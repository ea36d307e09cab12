"""Arrays by reference: an array server (`lampy serve`), references to its `.npy` files, and
on-demand publishing of large arguments, so each chunk pulls just its rows instead of the
client pushing every byte through one connection.

The modules a sandbox imports (`npy`, `auth`, `reference`) need only the standard library and
numpy; the server and the publisher (aiohttp, subprocesses) run on the caller's machine.
"""
