"""`pocketlm serve`: an OpenAI-compatible HTTP server with continuous batching.

schemas (wire models) -> convert (pure wire <-> engine functions) -> scheduler (the
batching loop) -> app (thin FastAPI routes); static/index.html is the chat page.
"""

# New tokens for a request that leaves max_tokens out (`serve --max-tokens`): room for a
# full answer, not the whole context window (which took 4,058 tokens and 383 s on a CPU).
# Here, in a module that imports nothing, so `pocketlm serve --help` shows it without torch.
DEFAULT_MAX_TOKENS = 512
