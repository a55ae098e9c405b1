"""The ``residlab`` command line (typer), the top layer: each command parses its options, calls the
library and prints; failures are one ``error:`` line plus a ``hint:``."""
