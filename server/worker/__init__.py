"""The GPU worker process.

main.py        open the store, load and warm up the model, serve
loop.py        the claim loop (and dynamic batching's compatible claims); stop and drain
execute.py     run claimed jobs, store their outputs, settle each in the store
runs.py        each job in hand with one named state, shared by the worker's threads
heartbeat.py   lease renewal, progress, cancellation; the worker's own row in the registry
failures.py    exception -> v3 task code, one table
gpu.py         CUDA memory figures, a clean slate after a failure
supervisor.py  worker processes started and restarted beside the API (or alone)
"""
