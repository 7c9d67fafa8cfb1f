"""P4: DANN domain adaptation across digit data sets."""
