"""How regions run: planning, settings, executors, codec, combining and the worker entry."""
