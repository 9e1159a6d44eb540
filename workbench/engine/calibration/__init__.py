"""Calibration: the data, the observers' pass, the user's metric."""
