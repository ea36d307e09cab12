"""What a region is: the decorators, argument binding, and the decorated function."""
