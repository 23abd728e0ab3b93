"""Reading proteins and writing results: FASTA in; HDF5/TSV/GFF3/JSONL out; shard merge."""
