"""fixres: train/test resolution discrepancy (FixRes) experiments."""
