"""MLFF deployment pieces: the adapter and registry file formats, the classifier, the runner."""
