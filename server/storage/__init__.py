"""Where input and output files live, behind one small interface (``base.Storage``).

base.py      the interface, its error, and how keys are made
local.py     a folder on this machine (the embedded default)
s3.py        S3 or any S3-compatible server (scale-out)
memory.py    in memory (tests)
factory.py   the backend the settings name, and a client's link to a stored file
"""
