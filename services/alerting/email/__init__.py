"""The email channel: the one SMTP sender of the platform (alerts, welcome and password-reset mails)."""
