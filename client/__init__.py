"""gRPC client for the ranker ensemble: request contract, request generator, scoring, validation."""
