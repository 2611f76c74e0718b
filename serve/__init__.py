"""The inference gateway: promoted registry versions behind an OpenAI-compatible API.

settings.py   ServeSettings (YAML + TUNEOPS_SERVE_* environment)
protocol.py   OpenAI request/response bodies
errors.py     APIError family and the one place exceptions become HTTP responses
engine.py     continuous batching over one base model with many LoRA adapters (kv_slots.py, lora.py, sampling.py,
              detokenizer.py)
versions.py   NAME / NAME@ALIAS / NAME/VERSION -> loaded adapter; alias watching, warm-up, atomic switch
serving.py    OpenAI chat/text completions on the engine, streaming and not
capture.py, feedback.py              traffic as MLflow traces (written by a separate process), POST /v1/feedback
auth.py, middleware.py, metrics.py   API keys, request ids and body limit, Prometheus metrics
gateway.py    what one running gateway holds (engine, versions, keys, metrics) and its phase
app.py, api.py, server.py            app factory with lifespan, thin routes, uvicorn with drain on SIGTERM
"""
