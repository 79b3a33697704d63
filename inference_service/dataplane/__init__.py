"""The data plane: the Open Inference Protocol v2 gRPC service."""
