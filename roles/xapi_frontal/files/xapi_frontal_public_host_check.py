"""Run with Pod's venv python, as Pod's user: the frontal's public host name through the
validator Ralph's models apply to a statement's mbox (pydantic calls email_validator's
validate_email without the deliverability check), so that a name Pod's view would drop every
statement for is caught before the bundle changes anything. Reads {"host": ...} on stdin,
prints {"checked", "ok", "detail", "validator"} as JSON.
"""

import json
import sys
from importlib import metadata

host = json.load(sys.stdin)["host"]
try:
    from email_validator import EmailNotValidError, validate_email
except ImportError as exc:
    print(json.dumps({"checked": False, "ok": True, "detail": str(exc), "validator": None}))
    raise SystemExit(0) from None
validator = "email-validator " + metadata.version("email-validator")
try:
    validate_email("xapi-check@" + host, check_deliverability=False)
except EmailNotValidError as exc:
    print(json.dumps({"checked": True, "ok": False, "detail": str(exc), "validator": validator}))
else:
    print(json.dumps({"checked": True, "ok": True, "detail": "", "validator": validator}))
