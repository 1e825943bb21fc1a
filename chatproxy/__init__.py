"""chatproxy: resilient streaming of LLM chat completions for Django."""

__version__ = "0.1.0"
