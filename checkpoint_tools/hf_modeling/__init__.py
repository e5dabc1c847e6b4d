"""The transformers code shipped next to exported weights (``trust_remote_code=True``): config and model classes."""
