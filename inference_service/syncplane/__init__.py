"""The sync plane: weights pushed by trainers, staged off the request path, swapped atomically."""
