"""Ray Serve deployments of the same model code (generation engine, OpenAI-style ingress): to come."""
