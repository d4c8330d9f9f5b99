"""sdde-serve runtime: serving, batch scoring, evaluation and calibration without PyTorch."""

__version__ = "0.1.0"
