"""What a person or a daemon runs: the CLI, ``serve``, the landing watcher, notifications, the drift
scenario and the printed reports. Imports any layer below."""
