"""The weights codec: safetensors framing streamed both ways, and the digest of a model's state."""
