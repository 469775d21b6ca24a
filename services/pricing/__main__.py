"""`python -m services.pricing` starts the pricing service."""

from services.pricing.app import create_app
from shared.service_app import serve

if __name__ == "__main__":
    serve("pricing", create_app)
