"""Data: the embedded soundfont generator, manifests, dataset readers and shards."""
