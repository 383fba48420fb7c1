"""Parallel task data: the shared schema, the synthetic world's writer and real-dataset loaders."""
