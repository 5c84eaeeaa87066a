"""spec_torch."""
