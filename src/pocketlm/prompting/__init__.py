"""Prompting harnesses: chat conversations (template or transcript) and few-shot prompts.

Built on the engine's sessions; knows nothing of terminals or HTTP.
"""
