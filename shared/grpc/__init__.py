"""gRPC plumbing both services share: status mapping, server and channel options."""
