"""`python -m services.gateway` starts the gateway service."""

from services.gateway.app import create_app
from shared.service_app import serve

if __name__ == "__main__":
    serve("gateway", create_app)
