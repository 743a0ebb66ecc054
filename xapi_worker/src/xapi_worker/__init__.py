"""xAPI worker for Esup-Pod: consumes ``pod.xapi.xapi_tasks.send_xapi_statement_task`` from
queue ``xapi`` and delivers the statements to an xAPI 1.0.3 LRS in batches."""

__version__ = "1.0.0"
