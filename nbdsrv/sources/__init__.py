"""Export backends."""
