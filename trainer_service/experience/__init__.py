"""The trainer's experience plane: agents stream samples into the buffers its trainers read.

`buffers.py` builds the app's buffers and their data users; `service.py` stores a batch (checks
it against its buffer, then hands its samples to the buffer's collector); `servicer.py` is the
experience.v1 gRPC face of that; `server.py` serves it on its own address, with a token and
TLS of its own (`--experience-token`, `--experience-tls-*`).
"""
