"""Ray + MLflow glue: step functions, the DAG runner, the generic Ray Train loop, MLflow logging, CLI."""

import os

# Ray reads this when it is first imported: with it at 0 a local Ray binds 127.0.0.1 only,
# instead of the machine's external address. Set before anything here imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
