"""The server: one contract, one store, rooms by process.

Data flows one way: request -> job row -> worker -> storage -> result / webhook.

    settings.py  errors.py  logs.py  cli.py   shared by every process
    jobs/        the only code that speaks SQL: the typed job contract, the store, outbox, registry
    storage/     where files live (a local folder, S3), behind one interface
    media/       every byte from outside is checked here: references, fetch, images, the SSRF guard
    api/         the API process: FastAPI app, routes, submission, rendering, background tasks
    worker/      the GPU process: claim loop, execution, heartbeat, failures, supervisor

The HTTP layer never touches torch; ``pipelines/`` never touches HTTP or SQL; the job row, typed
as ``jobs.contract.JobParams``, is all they share.
"""
