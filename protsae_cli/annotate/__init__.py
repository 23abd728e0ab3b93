"""The annotate pipeline: proteins -> PLM -> SAE codes -> calls -> writers, with resume and workers."""
