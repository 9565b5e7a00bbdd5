"""The serving engine: one replica's model (`runner`), its paged KV cache (`kv_cache`, `blocks`),
the scheduler and continuous batching around it (`scheduler`, `batching`), sampling, compiled
steps and the replica's metrics. `upcycle.deploy.app` puts it behind Ray Serve; Ray Data
generation and RLHF rollouts drive the same `Engine` directly."""
