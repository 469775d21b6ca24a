"""`python -m services.analytics` starts the analytics service."""

from services.analytics.app import create_app
from shared.service_app import serve

if __name__ == "__main__":
    serve("analytics", create_app)
