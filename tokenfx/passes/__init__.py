"""Graph passes and the PassManager."""
