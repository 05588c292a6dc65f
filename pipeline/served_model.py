"""The served model's entry file (MLflow's models from code): ``export`` logs this file as the model's code
(``mlflow.pyfunc.log_model(python_model=<this file>)``), with ``served.py`` and ``ksm_core`` in the model's
``code/`` folder, and MLflow runs it to make the model: its last line hands MLflow the model object.

It runs in two places. Where the model is loaded or served, ``code/`` is on ``sys.path`` and ``served`` is the
model's own copy of ``pipeline/served.py``. While ``export`` saves the model, MLflow runs it once in the exporting
process (to check it), where that code is ``pipeline.served``. Nothing of the pipeline imports this module.
"""
from mlflow.models import set_model

try:
    from served import MultiTaskModel  # the model's code/served.py
except ModuleNotFoundError as e:
    if e.name != "served":  # served.py itself is missing a dependency: say that, not something else
        raise
    from pipeline.served import MultiTaskModel  # export saving the model, from the repository

set_model(MultiTaskModel())
