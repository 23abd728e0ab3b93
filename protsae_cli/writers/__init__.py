"""Output writers: HDF5 (sparse CSR codes + segments + provenance), TSV (segments) and GFF3, all atomic."""
