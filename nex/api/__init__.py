"""Wire types only (msgspec): what crosses NATS. Nothing here imports the node."""
