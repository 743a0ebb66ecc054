"""xAPI worker for Esup-Pod: consumes ``pod.xapi.xapi_tasks.send_xapi_statement_task`` from
queue ``xapi`` and delivers the statements to an xAPI 1.0.3 LRS in batches."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xapi-worker")  # pyproject.toml is the one place it is written
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"
