"""A bare `pytest` from the repository's root: `collections/` links the checkout to itself
(the collection resolved by FQCN from a checkout), which pytest would walk without end. The
suites run as `pytest tests`, `pytest xapi_worker/tests` and molecule's verifiers."""

collect_ignore = ["collections"]
