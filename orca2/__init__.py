"""orca2: teach small language models how to reason (strategy prompts, prompt erasure, loss-masked SFT)."""

__version__ = "0.1.0"
