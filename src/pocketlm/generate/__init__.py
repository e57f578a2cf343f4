"""The engine: sequences and their caches, the per-request sampling state and the text
stream, one token loop for a sequence, speculative decoding, compiled steps.

Knows nothing of HTTP or terminals. The defaults below live here, in a module that
imports nothing, so the command line can show them without loading torch.
"""

MAX_TOKENS = 128  # new tokens at most, unless a request says otherwise
LOOKAHEAD = 4  # tokens a speculative draft proposes a round
CONTEXT = 4096  # tokens of context window unless `context=` asks for more (or the model has less)
