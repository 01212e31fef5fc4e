"""Data formats and shared I/O: every file a stage reads or writes, RLE, ids, layouts, the fingerprint."""
