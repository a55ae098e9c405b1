"""Serving a (possibly steered) model behind an OpenAI-compatible HTTP endpoint, on any engine."""
