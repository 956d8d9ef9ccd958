"""Ray + MLflow glue: step functions, the DAG runner, the generic Ray Train loop, MLflow logging, CLI."""
