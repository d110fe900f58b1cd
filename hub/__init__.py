"""Hub export, push and model card of a trained KptLLM folder (`python -m hub.export --help`)."""
