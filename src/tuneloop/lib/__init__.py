"""The libraries the stages share: token counting, the GX adapter, answering, metrics, the registry, the
ledger, sources and snapshots. Below the stages (``tuneloop.tasks``), above the vocabulary (``tuneloop.core``):
a lib module imports core and other lib modules, never a stage, a flow or the app."""
