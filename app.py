"""Command line and Hugging Face Spaces entry point (the UI lands with issue 4)."""
