"""What a loss receives, the shared token helpers, and the built-in ce loss."""
