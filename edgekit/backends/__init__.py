"""Deployment backends: how each target builds its artifact files and runs them."""
