"""Runs spread over many processes and machines: ``ray_pool`` (evaluation over Ray actors, one
engine each, records stored by the driver). The only package that imports ``ray``; nothing below it
does (an import-linter contract keeps it so), and ``ray`` is imported only when a run asks for it."""
