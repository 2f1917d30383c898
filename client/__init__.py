"""gRPC client for a split ranker on Triton, any model family: requests built and checked from
the declaration the server publishes, a request generator driven by feature roles, scoring,
validation."""
