"""Stages: each reads records, asks models or trains, writes records. Only the pipeline and the CLI import them."""
