"""The stages: each a plain typed function plus a thin Prefect task. Imports ``tuneloop.core`` only."""
