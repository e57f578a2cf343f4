"""pocketlm: run GPT-2 and other open causal language models on your own machine.

    import pocketlm
    lm = pocketlm.load("gpt2")
    print(lm.generate("Alice was beginning to", max_tokens=32).text)

`load` and `LM` are imported on first use, so `import pocketlm.errors` (or a quick CLI
command) does not pay for importing torch.
"""

__version__ = "0.1.0"
__all__ = ["LM", "load"]


def __getattr__(name: str):
    if name in __all__:
        from pocketlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'pocketlm' has no attribute {name!r}")
