"""`python -m services.conversion` starts the conversion service."""

from services.conversion.app import create_app
from shared.service_app import serve

if __name__ == "__main__":
    serve("conversion", create_app)
