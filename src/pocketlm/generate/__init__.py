"""The engine: sequences and their caches, the per-request sampling state and the text
stream, one token loop for a sequence, speculative decoding, compiled steps.

Knows nothing of HTTP or terminals.
"""
