"""What the images run: the MLflow server, the API service and its /mlflow proxy. Imports every other concern."""
