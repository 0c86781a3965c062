"""OpenAI / vLLM-compatible routes of ``lmonnx serve`` (placeholder: being written)."""


def add_openai_routes(app, service) -> None:
    return None
