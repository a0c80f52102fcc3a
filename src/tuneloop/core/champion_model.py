"""The champion pyfunc as MLflow "models from code": MLflow copies this file into the model and runs it on load,
so nothing is pickled (no CloudPickle to trust when loading a model from the registry)."""

from mlflow.models import set_model

from tuneloop.core.serving import ChampionModel

set_model(ChampionModel())
