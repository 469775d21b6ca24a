"""`python -m services.alerting` starts the alerting service."""

from services.alerting.app import create_app
from shared.service_app import serve

if __name__ == "__main__":
    serve("alerting", create_app)
