"""What the model computes, exposed exactly: token log-probabilities and perplexity
(`features.scores`), hidden states and embeddings (`features.hidden`).

Pure functions of (model, token ids): they know nothing of text, files, the terminal or
HTTP, so the CLI, the Python API and the server all call the same code. Every forward
pass here runs without a KV cache, on windows of at most the model's context length.
This module itself imports nothing, so the command line can offer its choices without
loading torch.
"""

POOLS = ("mean", "last", "none")  # how `embed` reduces a text's token vectors
