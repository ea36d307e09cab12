"""A subpackage of the user's package."""
