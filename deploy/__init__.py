"""Production deployment: the tritonserver command line, what the edge forwards, and the
Kubernetes manifests generated from both (deploy/k8s/)."""
