"""Live push: the gateway's websocket ``/api/v1/ws`` (prices as they are consolidated, a user's alert events)."""
