"""`python -m caraserve.router`: the OpenAI-compatible router over caraserve.serve replicas."""
