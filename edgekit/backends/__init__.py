"""One module (or folder) per backend, each registering one ``BackendSpec`` (see ``registry``)."""
