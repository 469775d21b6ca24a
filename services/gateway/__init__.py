"""Gateway: the one public door. Routes /api/v1 to the owning service and serves the merged spec."""
