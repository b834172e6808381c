"""slim-ray: SLIM (distilled LLM rationales for sequential recommendation) on Ray."""

__version__ = "0.1.0"
