"""The job store: the only code that speaks SQL.

contract.py  Job, JobParams, ImageRef, LoraRef, Status, WorkerState: what the processes share
models.py    the tables (SQLAlchemy Core); changed only by migrations/
db.py        the engine, its pragmas, migrations under a lock, the notifier, StoreUnavailable
store.py     the job life cycle (create, claim, heartbeat, complete, fail, release, reap),
             counts, retention, aggregates for metrics; ``JobStore.open(settings)``
outbox.py    webhook deliveries, written in the transaction that ends a job
registry.py  worker rows, server-wide values, GPU memory
notify.py    wake-ups between processes (Unix sockets, LISTEN/NOTIFY)
"""
