"""The composition root: the server's start-up and drain, worker processes."""
