"""paysvc: the payment core of Cambodia's digital public services."""

__version__ = "0.1.0"
