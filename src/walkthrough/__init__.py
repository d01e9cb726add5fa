"""walkthrough: turn unlabeled gameplay video into training data for generalist gaming agents."""

__version__ = "0.1.0"
