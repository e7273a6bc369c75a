"""qgate: decide whether a quantized LLM checkpoint may ship."""

__version__ = "0.1.0"
