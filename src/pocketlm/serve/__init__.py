"""`pocketlm serve`: an OpenAI-compatible HTTP server with continuous batching.

schemas (wire models) -> convert (pure wire <-> engine functions) -> scheduler (the
batching loop) -> app (thin FastAPI routes); static/index.html is the chat page.
"""
