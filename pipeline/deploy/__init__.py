"""Using a trained run outside the DAG: the exported bundle's format, its numpy pre/post-processing, and `segment`."""
