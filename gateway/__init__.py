"""apixo-gateway: a local proxy gateway for the APIXO image-generation API."""

__version__ = "0.1.0"
