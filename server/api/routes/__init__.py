"""The HTTP routes, one module per door: predictions (submit, result, cancel), media (uploads,
files), ops (livez, readyz, metrics, webhook secret), openai (/v1/images/edits), playground."""
