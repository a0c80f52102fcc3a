"""Pipeline configs and the Prefect deployment file shipped with tuneloop (package data)."""
