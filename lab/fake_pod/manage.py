#!/usr/bin/env python3
"""Lab stand-in for Pod's manage.py: records every invocation and does nothing else.

The tests read the record to prove that no database- or index-resetting command ran.
"""

import datetime
import os
import sys

RECORD = "/var/log/pod-invocations.log"

with open(RECORD, "a", encoding="utf-8") as record:
    now = datetime.datetime.now(datetime.UTC).isoformat()
    record.write(f"{now} manage.py {' '.join(sys.argv[1:])} cwd={os.getcwd()}\n")
