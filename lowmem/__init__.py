"""Low-memory trainer for Hugging Face language models: streaming data, exact resume, Accelerate loop."""
