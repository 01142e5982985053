"""`edgekit station`: the inspection service over an `edgekit update` install root (issue 22)."""
