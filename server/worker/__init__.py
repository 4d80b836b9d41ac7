"""The GPU worker process.

main.py        open the store, load and warm up the model, serve
loop.py        the claim loop (and dynamic batching's compatible claims); stop and drain
overlap.py     the next job claimed and loaded while this one runs; outputs stored on threads of their own
execute.py     run claimed jobs, store their outputs, settle each in the store
runs.py        each job in hand with one named state, shared by the worker's threads
heartbeat.py   lease renewal, progress, cancellation; the worker's own row in the registry
failures.py    exception -> v3 task code, one table
gpu.py         CUDA memory figures, a clean slate after a failure
supervisor.py  worker processes started and restarted beside the API (or alone)
group.py       a worker as a group of processes, one per GPU (QWEN_EDIT_PARALLEL); rank 0's runner
channel.py     rank 0 hands each run, and each step's go-on, to the other ranks (its TCPStore)
ranks.py       who is who in a group: rank identity, devices, each group's GPUs
"""
