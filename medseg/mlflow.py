"""medseg's MLflow model flavor, ``mlflow.<flavor>``-style.

::

    import mlflow, medseg.mlflow

    with mlflow.start_run():
        info = medseg.mlflow.log_model("export/", registered_model_name="liver")
    segmenter = medseg.mlflow.load_model("models:/liver@champion")  # a medseg.Segmenter
    card = medseg.mlflow.load_card("models:/liver/1")  # MLmodel only, no weights fetched

The logged model also carries a ``python_function`` flavor, so ``mlflow.pyfunc.load_model``
and ``mlflow models serve`` keep working where medseg is not installed. The export stage logs
its model this way.
"""

from medseg.tracking.flavor import FLAVOR_NAME, load_card, load_model, log_model, save_model

__all__ = ["FLAVOR_NAME", "load_card", "load_model", "log_model", "save_model"]
