"""Great Expectations suites shipped with tuneloop (package data, read through importlib.resources)."""
