"""tuneloop keeps a fine-tuned language model fresh on a company's own data.

Layers point one way (a test walks the imports): ``tuneloop.core`` (config, records, state, mapping, PII,
the serving model; no Prefect) <- ``tuneloop.tasks`` (the stages) <- ``tuneloop.flows`` (composition)
<- ``tuneloop.app`` (CLI, serve, watch, notify, scenario, reports).
"""

__version__ = "0.1.0"
