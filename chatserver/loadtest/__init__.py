"""chatserver-loadtest: a multi-instance load generator."""
