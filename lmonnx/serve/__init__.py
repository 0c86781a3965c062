"""``lmonnx serve``: one model behind HTTP, batched across callers.

The modules, in the order a request meets them (each imports only those before it)::

    protocol        request bodies, error answers, strict JSON (imports no route)
    batch_queue     the queue and compute thread: many callers' work in one onnxruntime call
    states          decoder states kept under opaque ids (bytes-bounded LRU, TTL)
    telemetry       Prometheus metrics
    service         the model as async methods: a Scorer, its queue, its states
    openai_routes   the OpenAI / vLLM routes
    app             the HTTP app (the gate, the routes, drain on SIGTERM) and uvicorn
    ray_deployment  the same app as a Ray Serve deployment (``lmonnx serve --ray``)

Importing this package imports none of them (FastAPI and uvicorn come with the ``serve``
extra).
"""
