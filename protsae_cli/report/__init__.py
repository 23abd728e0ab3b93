"""Human-readable outputs: the HTML report, its figures, structure colouring."""
