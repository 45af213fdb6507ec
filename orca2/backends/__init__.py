"""Backends: how a request reaches a model (openai, batch, local, program). Stages never import these; orca2.ask
does."""
