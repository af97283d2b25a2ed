"""sparkd: a systemd-native supervisor for LLM inference engines on a DGX Spark."""

__version__ = "0.1.0"
