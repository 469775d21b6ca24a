"""The web dashboard: server-rendered pages (Jinja2), hand-written CSS and small JavaScript modules, served by
the gateway at ``/`` on the API's origin, signed in with cookies (services/gateway/web/session.py)."""
