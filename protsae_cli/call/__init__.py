"""From per-residue SAE codes to concept calls: thresholds, segments, topology decoding."""
