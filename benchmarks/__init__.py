"""Side-by-side performance runs of the session engine against its peers.

Run `python -m benchmarks.run` (see benchmarks/RESULTS.md). Knows nothing of
the UI's widgets: the UI case talks to it over HTTP with gradio_client.
"""
