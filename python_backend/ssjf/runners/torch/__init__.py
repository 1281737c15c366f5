"""The `torch` runner: our own forward pass over a static KV cache (runner.py), the model it
drives (model.py), and the C kernels of its CPU decode step (ssjf.kernels)."""
