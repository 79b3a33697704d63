"""The inference service: serves models over OIP v2 and hot-swaps weights trainers push."""
