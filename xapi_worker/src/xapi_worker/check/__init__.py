"""check_xapi (roles/xapi_ops): the xAPI pipeline's Nagios check and Prometheus textfile, in
the standard library only, so that it runs with the system's Python where the worker's venv
is not installed (the role ships these modules with names.py, resp.py and urls.py)."""
