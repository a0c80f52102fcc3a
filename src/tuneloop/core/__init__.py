"""The vocabulary every layer shares: configuration, typed records, state layout, record->chat mapping,
PII, and the serving model. Nothing here imports Prefect: a service that loads models:/NAME@champion
needs only this layer."""
