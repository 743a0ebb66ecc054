"""ASGI entry point for Ralph's LRS with a working file-system backend.

Ralph 5.1.0's FS LRS backend writes statements in CREATE mode: the first write creates the
store file and every later one fails with 500 "Statements bulk indexation failed" because the
file already exists. APPEND mode is what a statement store needs, so it is made the backend's
default here, before Ralph's API module builds its backend client. Serve with:
    uvicorn ralph_lrs_app:app --host ADDRESS --port 8100
"""

from ralph.backends.data.base import BaseOperationType
from ralph.backends.lrs.fs import FSLRSBackend

FSLRSBackend.default_operation_type = BaseOperationType.APPEND

from ralph.api import app  # noqa: E402  (must come after the patch above)

__all__ = ["app"]
