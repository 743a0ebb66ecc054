"""Helpers shared by the bundle's tests (tests/), the worker's tests (xapi_worker/tests), the
molecule scenarios' tests and the benchmark: see testsupport/README.md."""
