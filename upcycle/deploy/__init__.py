"""Serving the training model code: KV cache inside megatron's attention, continuous batching,
an OpenAI-compatible FastAPI ingress and autoscaled engine replicas on Ray Serve."""
