"""Registers this distribution's components with banax (filled in by its issue)."""
