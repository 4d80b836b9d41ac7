"""Errors of the pipeline layer that blame the inputs, not the model code.

The worker maps ``PipelineInputError`` to the client's fault (1401 "invalid input"); any other
exception from a pipeline, a ``ValueError`` deep inside diffusers included, is a task failure.
"""

from __future__ import annotations


class PipelineInputError(ValueError):
    """The inputs cannot run on this pipeline; the message says what to change."""
