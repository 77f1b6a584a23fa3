"""Development tools kept out of the Bento: the demo/test trainer, a local test server, metric parsing."""
