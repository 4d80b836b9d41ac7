"""The API process.

app.py         wiring: services, routers, middleware, background tasks
deps.py        the services and the FastAPI dependencies that hand them out
submit.py      a submission in named steps, shared by the v3 and OpenAI doors
render.py      the prediction object: results, sync mode, webhooks, the OpenAI door
schemas.py     the v3 request and response models (examples.py: their /docs examples)
handlers.py    every HTTP error as the v3 envelope (OpenAI's shape on /v1), mapped once
auth.py  limits.py  uploads.py  middleware.py  telemetry.py
routes/        predictions, media, ops, openai, playground
tasks/         the done fan-out, sync waiter, webhook dispatcher, retention, reaper
static/        the Playground page
"""
