"""Concept labels: annotation file formats, label sets, the concept ontology."""
