"""What the API process runs in the background, beside its requests.

fanout.py     one "done" listener per process, feeding the two below
waiter.py     sync mode: wake the requests whose job ended
webhooks.py   deliver the webhook outbox, signed, with backoff
retention.py  forget old finished jobs and their files
reaper.py     return expired leases to the queue when no worker does
"""
