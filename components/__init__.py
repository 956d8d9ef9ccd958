"""reprflow components: pure PyTorch/NumPy building blocks (never imports ray or mlflow).

Everything here can be used in a plain PyTorch loop; ``pipelines/`` holds the Ray and MLflow glue.
"""
