"""Import string target for bench/serve.py: `bench.serve_app:app`."""

from bench.mlp import app as _build

app = _build()
