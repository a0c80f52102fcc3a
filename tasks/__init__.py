"""The stages: one module each, a plain typed function plus a thin Prefect task. A stage imports the
vocabulary (``tuneloop.core``) and the libraries below it (``tuneloop.lib``), never another stage: what two
stages share lives in ``tuneloop.lib`` (``tests/test_layers.py`` checks it)."""
