"""Adapters from a host's objects (diffusers pipelines, ...) to the engine."""
