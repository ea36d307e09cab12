"""A user's own package split over several modules, none of it installed in a sandbox: the
regions in `regions` call helpers of sibling modules and a subpackage, use a helper cached with
`functools.lru_cache`, a module object, and classes of another module (tests/runtime/openlambda/
test_own_code.py runs them on both workers)."""
