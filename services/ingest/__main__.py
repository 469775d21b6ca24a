"""`python -m services.ingest` starts the ingest service."""

from services.ingest.app import create_app
from shared.service_app import serve

if __name__ == "__main__":
    serve("ingest", create_app)
