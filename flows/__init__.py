"""The flows: retrain, train-local, drift-monitor. Composition only: they import tasks and core."""
