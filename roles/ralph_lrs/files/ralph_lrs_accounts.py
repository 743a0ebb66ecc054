"""Makes Ralph's credentials file hold exactly the given accounts (run with Ralph's venv).

Input on stdin (JSON, so no password ever reaches a command line):
    {"auth_file": PATH, "check": bool, "accounts": [{"username", "password", "mbox"}]}
Output: {"changed": bool}. An account whose stored bcrypt hash already matches its password
keeps its hash, so a second run changes nothing (bcrypt salts differ on every hashing).
"""

import json
import os
import sys
from pathlib import Path
from typing import Any

import bcrypt


def wanted_entry(account: dict[str, str], current: dict[str, Any] | None) -> dict[str, Any]:
    password = account["password"].encode()
    if current and bcrypt.checkpw(password, current.get("hash", "").encode()):
        hashed = current["hash"]
    else:
        hashed = bcrypt.hashpw(password, bcrypt.gensalt()).decode()
    return {
        "agent": {"mbox": account["mbox"], "objectType": "Agent"},
        "scopes": ["all"],
        "hash": hashed,
        "username": account["username"],
    }


def main() -> int:
    request = json.load(sys.stdin)
    auth_file = Path(request["auth_file"])
    current = json.loads(auth_file.read_text()) if auth_file.exists() else []
    by_name = {entry.get("username"): entry for entry in current}
    wanted = [wanted_entry(a, by_name.get(a["username"])) for a in request["accounts"]]
    changed = wanted != current
    if changed and not request.get("check"):
        tmp = auth_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(wanted, indent=2))
        os.chmod(tmp, 0o640)
        tmp.replace(auth_file)
    json.dump({"changed": changed}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
