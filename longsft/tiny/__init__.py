"""Tiny offline stand-ins of real model folders (tokenizers.py, models.py, chat_templates.py) for the tests, the
benchmarks and the CPU quickstart; `python tools/make_tiny.py` is their command line."""
