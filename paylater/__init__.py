"""paylater-risk: shared settings, time semantics and the command line."""
