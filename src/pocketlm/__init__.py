from pocketlm.api import LM, load

__all__ = ["LM", "load"]
__version__ = "0.1.0"
