"""Property-based tests (hypothesis) of the public layers.

`cases` holds the strategies (layers with every router, inputs, masks,
dtypes) and the one harness that runs a case; the test modules state the
properties. The hypothesis profiles are registered in `tests/conftest.py`:
every property runs a bounded, derandomized profile by default and a larger
one in its `slow`-marked twin.
"""
